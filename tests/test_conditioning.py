"""Mask strategies, inline-JSON prompts and loop prompts, checked on Open-Sora 1.2's documented examples.

The examples are those of upstream's docs/commands.md and docs/config.md (v1.2.0). Expected masks are written
out by hand from upstream's semantics; with $OPEN_SORA_ROOT set, the same inputs also go through upstream's own
functions (taken out of opensora/utils/inference_utils.py with `ast`, without importing Open-Sora) and must match.
"""

import ast
import os
from pathlib import Path

import pytest
import torch

from duca_video.conditioning import (
    ConditionPromptError,
    MaskGroup,
    MaskStrategyError,
    Placement,
    loop_condition_group,
    parse_conditioned_prompt,
    parse_mask_strategy,
    plan_frames,
)
from duca_video.conditioning.latents import condition_latents
from duca_video.conditioning.strategy import format_mask_strategy
from duca_video.io import PromptError

JEEP = (
    "|0|a white jeep equipped with a roof rack driving on a dirt road in a coniferous forest."
    "|2|a white jeep equipped with a roof rack driving on a dirt road in the desert."
    "|4|a white jeep equipped with a roof rack driving on a dirt road in a mountain."
    "|6|A white jeep equipped with a roof rack driving on a dirt road in a city."
    "|8|a white jeep equipped with a roof rack driving on a dirt road on the surface of a river."
    "|10|a white jeep equipped with a roof rack driving on a dirt road under the lake."
    "|12|a white jeep equipped with a roof rack flying into the sky."
    "|14|a white jeep equipped with a roof rack driving in the universe. Earth is the background."
)
D0 = "https://cdn.openai.com/tmp/s/interp/d0.mp4"
# (name, prompt exactly as in the docs, loops, text before the JSON, references)
DOC_PROMPTS = [
    (
        "image",
        'A breathtaking sunrise scene.{"reference_path": "assets/images/condition/wave.png","mask_strategy": "0"}',
        1,
        "A breathtaking sunrise scene.",
        ("assets/images/condition/wave.png",),
    ),
    (
        "extend",
        f'A car driving on the ocean.{{"reference_path": "{D0}","mask_strategy": "0,0,0,-8,8"}}',
        1,
        "A car driving on the ocean.",
        (D0,),
    ),
    ("long", JEEP + f'{{"reference_path": "{D0}", "mask_strategy": "0,0,0,0,16"}}', 16, JEEP, (D0,)),
    (
        "connect",
        'A breathtaking sunrise scene.{"reference_path": "assets/images/condition/sunset1.png;'
        'assets/images/condition/sunset2.png","mask_strategy": "0;0,1,0,-1,1"}',
        1,
        "A breathtaking sunrise scene.",
        ("assets/images/condition/sunset1.png", "assets/images/condition/sunset2.png"),
    ),
    (
        "edit",
        'A cyberpunk-style city at night.{"reference_path": "https://cdn.pixabay.com/video/2021/10/12/'
        '91744-636709154_large.mp4","mask_strategy": "0,0,0,0,32,0.4"}',
        1,
        "A cyberpunk-style city at night.",
        ("https://cdn.pixabay.com/video/2021/10/12/91744-636709154_large.mp4",),
    ),
]

K, G = 0.0, 1.0  # keep (a reference frame), generate
P = Placement


def _mask(num_frames: int, **spans: object) -> tuple[float, ...]:
    """All 1 except the given spans: _mask(15, s0_8=0.3) sets frames [0, 8) to 0.3."""
    mask = [G] * num_frames
    for key, value in spans.items():
        start, stop = (int(v) for v in key[1:].split("_"))
        mask[start:stop] = [value] * (stop - start)
    return tuple(mask)


# (strategy, latent frames, reference latent lengths, loop, align, expected mask, expected placements).
# 15 latent frames / align 5 is Open-Sora 1.2's sample config (51 frames); 32 frames without align is the
# spatial-only VAE the docs' "--num-frames 32" commands were written for. Images are 1 latent frame.
CASES = [
    # image-to-video "0"
    ("0", 15, [1], 0, 5, _mask(15, s0_1=K), [P(0, 0, 0, 1, K)]),
    ("0", 32, [1], 0, None, _mask(32, s0_1=K), [P(0, 0, 0, 1, K)]),
    # extension "0,0,0,-8,8": target -8 is frame 7, aligned down to 5
    ("0,0,0,-8,8", 15, [15], 0, 5, _mask(15, s5_13=K), [P(0, 0, 5, 8, K)]),
    ("0,0,0,-8,8", 15, [15], 0, None, _mask(15, s7_15=K), [P(0, 0, 7, 8, K)]),
    ("0,0,0,-8,8", 32, [32], 0, None, _mask(32, s24_32=K), [P(0, 0, 24, 8, K)]),
    ("0,0,0,-8,8", 32, [3], 0, None, _mask(32, s24_27=K), [P(0, 0, 24, 3, K)]),  # cut to the reference
    # long video "0,0,0,0,16": length cut to the video
    ("0,0,0,0,16", 15, [15], 0, 5, _mask(15, s0_15=K), [P(0, 0, 0, 15, K)]),
    ("0,0,0,0,16", 32, [32], 0, None, _mask(32, s0_16=K), [P(0, 0, 0, 16, K)]),
    ("0,0,0,0,16", 15, [15, 15], 1, 5, _mask(15), []),  # loop-0 groups do nothing in loop 1
    # connecting "0;0,1,0,-1,1": the last frame (14) aligns to 10 with align 5, as upstream
    ("0;0,1,0,-1,1", 15, [1, 1], 0, 5, _mask(15, s0_1=K, s10_11=K), [P(0, 0, 0, 1, K), P(1, 0, 10, 1, K)]),
    ("0;0,1,0,-1,1", 15, [1, 1], 0, None, _mask(15, s0_1=K, s14_15=K), [P(0, 0, 0, 1, K), P(1, 0, 14, 1, K)]),
    ("0;0,1,0,-1,1", 32, [1, 1], 0, None, _mask(32, s0_1=K, s31_32=K), [P(0, 0, 0, 1, K), P(1, 0, 31, 1, K)]),
    # editing "0,0,0,0,32,0.4": every frame starts from the reference, kept until t falls to 0.4 * T
    ("0,0,0,0,32,0.4", 15, [15], 0, 5, _mask(15, s0_15=0.4), [P(0, 0, 0, 15, 0.4)]),
    ("0,0,0,0,32,0.4", 32, [32], 0, None, _mask(32, s0_32=0.4), [P(0, 0, 0, 32, 0.4)]),
    # docs/config.md
    ("0,0,0,0,8,0.3", 15, [15], 0, 5, _mask(15, s0_8=0.3), [P(0, 0, 0, 8, 0.3)]),
    ("0,0,0,0,1;0,0,0,-1,1", 15, [1], 0, 5, _mask(15, s0_1=K, s10_11=K), [P(0, 0, 0, 1, K), P(0, 0, 10, 1, K)]),
    ("0,0,0,0,1;0,0,0,-1,1", 32, [1], 0, None, _mask(32, s0_1=K, s31_32=K), [P(0, 0, 0, 1, K), P(0, 0, 31, 1, K)]),
    ("", 15, [], 0, 5, _mask(15), []),
    # the group upstream appends in loop 1 (previous clip = reference 1): --condition-frame-length 5 (v1.2)
    # and 8 (the docs' command; -8 of 15 is frame 7, aligned to 5)
    ("0,0,0,0,16;1,1,-5,0,5,0.0", 15, [15, 15], 1, 5, _mask(15, s0_5=K), [P(1, 10, 0, 5, K)]),
    ("0,0,0,0,16;1,1,-8,0,8,0.0", 15, [15, 15], 1, 5, _mask(15, s0_8=K), [P(1, 5, 0, 8, K)]),
    ("0,0,0,0,16;1,1,-8,0,8,0.0", 32, [32, 32], 1, None, _mask(32, s0_8=K), [P(1, 24, 0, 8, K)]),
    ("2,1,-5,0,5,0.25", 15, [15, 15, 15], 2, None, _mask(15, s0_5=0.25), [P(1, 10, 0, 5, 0.25)]),
]


def test_parser_defaults_and_groups():
    assert parse_mask_strategy("0") == (MaskGroup(),)
    assert parse_mask_strategy(None) == parse_mask_strategy("") == ()
    assert parse_mask_strategy("0;0,1,0,-1,1") == (MaskGroup(), MaskGroup(0, 1, 0, -1, 1, 0.0))
    assert parse_mask_strategy("0,0,0,0,32,0.4") == (MaskGroup(length=32, edit_ratio=0.4),)
    assert parse_mask_strategy(" 1, 2 ,-3") == (MaskGroup(1, 2, -3),)
    assert format_mask_strategy(parse_mask_strategy("0;1,1,-5,0,5")) == "0,0,0,0,1,0.0;1,1,-5,0,5,0.0"
    assert loop_condition_group(3, 4, 5, 0.2) == MaskGroup(3, 4, -5, 0, 5, 0.2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0] or 'none'}@{c[1]}/loop{c[3]}/align{c[4]}")
def test_documented_strategies_give_the_expected_masks(case):
    text, frames, ref_lengths, loop, align, mask, placements = case
    plan = plan_frames(parse_mask_strategy(text), frames, ref_lengths, loop=loop, align=align)
    assert plan.mask == mask
    assert list(plan.placements) == placements
    assert plan.conditioned == bool(placements)


def test_condition_latents_writes_the_reference_frames():
    z = torch.randn(2, 4, 15, 2, 3)
    refs = [[torch.randn(4, 1, 2, 3), torch.randn(4, 1, 2, 3)], [torch.randn(4, 15, 2, 3)]]
    plans = [
        plan_frames(parse_mask_strategy("0;0,1,0,-1,1"), 15, [1, 1]),
        plan_frames(parse_mask_strategy("0,0,0,-8,8,0.5"), 15, [15], align=5),
    ]
    out, mask = condition_latents(z, refs, plans)
    assert torch.equal(out[0, :, 0], refs[0][0][:, 0]) and torch.equal(out[0, :, 14], refs[0][1][:, 0])
    assert torch.equal(out[0, :, 1:14], z[0, :, 1:14])
    assert torch.equal(out[1, :, 5:13], refs[1][0][:, 0:8]) and torch.equal(out[1, :, :5], z[1, :, :5])
    assert mask.tolist() == [list(plans[0].mask), list(plans[1].mask)] and mask[1, 5:13].eq(0.5).all()


def test_documented_prompts():
    for name, prompt, loops, text, refs in DOC_PROMPTS:
        parsed = parse_conditioned_prompt(prompt, loops=loops, where=f"prompt {name}")
        assert parsed.text == text and parsed.references == refs, name
    long = parse_conditioned_prompt(DOC_PROMPTS[2][1], loops=16)
    assert [s.start_loop for s in long.segments] == list(range(0, 16, 2))
    assert long.text_for_loop(0) == long.text_for_loop(1) == JEEP.split("|")[2]
    assert long.text_for_loop(2).endswith("in the desert.") and long.text_for_loop(3).endswith("in the desert.")
    universe = "a white jeep equipped with a roof rack driving in the universe. Earth is the background."
    assert long.text_for_loop(14) == long.text_for_loop(15) == universe
    assert long.strategy == (MaskGroup(length=16),)
    # The prompt's JSON replaces the run's --reference-path / --mask-strategy, key by key.
    prompt = 'a cat{"mask_strategy": "0,0,0,-1"}'
    cli = parse_conditioned_prompt(prompt, reference_path="a.png;b.mp4", mask_strategy="0")
    assert cli.references == ("a.png", "b.mp4") and cli.strategy == (MaskGroup(target_start=-1),)
    plain = parse_conditioned_prompt("a cat", reference_path="a.png", mask_strategy="0")
    assert plain.segments is None and plain.text_for_loop(7) == "a cat" and plain.strategy == (MaskGroup(),)


STRATEGY_ERRORS = [
    ("0,a", "group 1 ('0,a'): reference index 'a' is not an integer"),
    ("0;0,1,0,1.5", "group 2 ('0,1,0,1.5'): target start '1.5' is not an integer"),
    ("0,0,0,0,1,1.5", "edit ratio 1.5 is outside [0, 1]"),
    ("0,0,0,0,1,-0.1", "edit ratio -0.1 is outside [0, 1]"),
    ("0,0,0,0,1,nan", "edit ratio nan is outside [0, 1]"),
    ("0,0,0,0,1,x", "edit ratio 'x' is not a number"),
    ("0,0,0,0,1,0,7", "7 fields, at most 6 are allowed (loop index, reference index, reference start"),
    ("0;", "group 2 (''): the group is empty"),
    ("0,0,0,0,0", "length 0 must be >= 1"),
    ("-1", "loop index -1 is negative"),
    ("0,-1", "reference index -1 is negative"),
]


@pytest.mark.parametrize("text, message", STRATEGY_ERRORS)
def test_bad_strategies_are_named(text, message):
    with pytest.raises(MaskStrategyError, match="^--mask-strategy: group") as info:
        parse_mask_strategy(text, where="--mask-strategy")
    assert message in str(info.value)
    assert isinstance(info.value, PromptError)  # the CLI reports it as "error: ..." with exit status 2


@pytest.mark.parametrize(
    "text, frames, refs, message",
    [
        ("0,2", 15, [1, 1], "reference index 2 does not exist: loop 0 has 2 reference(s)"),
        ("0,0,-3", 15, [1], "reference start -3 is outside the reference (1 latent frame: allowed -1..0)"),
        ("0,0,1", 15, [1], "reference start 1 is outside the reference"),
        ("0,0,0,15", 15, [1], "target start 15 is outside the video (15 latent frames: allowed -15..14)"),
        ("0,0,0,-16", 15, [1], "target start -16 is outside the video"),
    ],
)
def test_strategies_pointing_outside(text, frames, refs, message):
    with pytest.raises(MaskStrategyError, match="group 1") as info:
        plan_frames(parse_mask_strategy(text), frames, refs, align=5)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ('a cat{"reference_path": "a.png", "mask_strategy": "0"', {}, "is not valid JSON"),
        ('a cat{"reference_path": "a.png"} more text', {}, "is not valid JSON (Extra data"),
        ("a cat{'reference_path': 'a.png'}", {}, "is not valid JSON"),
        ('a cat{"reference": "a.png"}', {}, "unknown JSON key 'reference'; allowed: reference_path, mask_strategy"),
        ('a cat{"mask_strategy": 0}', {"reference_path": "a.png"}, "JSON 'mask_strategy' is 0, it must be a string"),
        ('a cat{"reference_path": null}', {}, "JSON 'reference_path' is null"),
        ('a {big} cat{"mask_strategy": "0"}', {}, "2 '{' found (at characters [2, 11])"),
        ('a cat{"mask_strategy": "0", "mask_strategy": "1"}', {}, "JSON key 'mask_strategy' is given twice"),
        (
            'a cat{"mask_strategy": "0,1"}',
            {"reference_path": "a.png"},
            "reference index 1 does not exist: there is 1 reference path (indices 0..0)",
        ),
        ('a cat{"mask_strategy": "0"}', {}, "no reference path is given"),
        ('a cat{"mask_strategy": "0,0,0,0,1,2"}', {"reference_path": "a.png"}, "prompt 3: mask_strategy: group 1"),
        ('a cat{"reference_path": "a.png;"}', {}, "reference 1 of 'a.png;' is empty"),
        ("|0|a cat|2", {"loops": 3}, "the last '|' ('2' after it) has no text"),
        ("|0|a cat|x|a dog", {"loops": 3}, "loop segment 1 starts with 'x', which is not a loop index"),
        ("|0|a cat|2|a dog|1|a cow", {"loops": 3}, "loop segment 2 starts at loop 1, after a segment for loop 2"),
        ("|0|a cat|2| ", {"loops": 3}, "loop segment 1 (loop 2) has no text"),
        ("|1|a cat", {}, "loop segments must start with '|0|'"),
        ("|0|a cat|4|a dog", {"loops": 3}, "it uses loop 4, but the run has 3 loops (0..2)"),
        ("a cat", {"reference_path": "a.png", "mask_strategy": "1,0"}, "it uses loop 1, but the run has 1 loop"),
    ],
)
def test_bad_prompts_are_named(prompt, kwargs, message):
    with pytest.raises(PromptError, match="^prompt 3") as info:
        parse_conditioned_prompt(prompt, **kwargs, where="prompt 3")
    assert message in str(info.value)
    assert isinstance(info.value, (ConditionPromptError, MaskStrategyError))


def test_loop_references_include_generated_clips():
    # Loop 1 may use the clip of loop 0 (appended after the user's references, as upstream); loop 0 may not.
    later = parse_conditioned_prompt("a", reference_path="a.png", mask_strategy="1,1,-5", loops=2)
    assert later.references == ("a.png",) and later.strategy == (MaskGroup(1, 1, -5),)
    with pytest.raises(MaskStrategyError, match="reference index 1 does not exist"):
        parse_conditioned_prompt("a", reference_path="a.png", mask_strategy="0,1", loops=2)


# ----------------------------------------------------------------------------------------- upstream's own code
_UPSTREAM_NAMES = {
    "MASK_DEFAULT",
    "parse_mask_strategy",
    "find_nearest_point",
    "apply_mask_strategy",
    "extract_json_from_prompts",
    "extract_prompts_loop",
    "split_prompt",
    "merge_prompt",
    "append_generated",
}


@pytest.fixture(scope="module")
def upstream() -> dict:
    root = os.environ.get("OPEN_SORA_ROOT")
    path = Path(root or ".") / "opensora" / "utils" / "inference_utils.py"
    if not root or not path.is_file():
        print("OPEN_SORA_ROOT is not set to an Open-Sora v1.2.0 checkout: upstream comparison skipped")
        pytest.skip("OPEN_SORA_ROOT is not set to an Open-Sora v1.2.0 checkout: upstream comparison skipped")

    def wanted(node: ast.stmt) -> bool:
        if isinstance(node, ast.FunctionDef):
            return node.name in _UPSTREAM_NAMES
        return isinstance(node, ast.Assign) and any(getattr(t, "id", None) in _UPSTREAM_NAMES for t in node.targets)

    keep = [node for node in ast.parse(path.read_text()).body if wanted(node)]
    namespace: dict = {}
    exec("import json, re, torch", namespace)  # noqa: S102 - upstream's own code, read from the user's checkout
    exec(compile(ast.Module(body=keep, type_ignores=[]), "upstream_inference_utils", "exec"), namespace)  # noqa: S102
    assert _UPSTREAM_NAMES <= namespace.keys()
    return namespace


def test_strategies_equal_upstream(upstream):
    for text, frames, ref_lengths, loop, align, *_ in CASES:
        ours = parse_mask_strategy(text)
        assert [[g.loop, g.reference, g.reference_start, g.target_start, g.length, g.edit_ratio] for g in ours] == (
            upstream["parse_mask_strategy"](text)
        ), text
        gen = torch.Generator().manual_seed(len(text) + frames)
        z = torch.randn(1, 4, frames, 2, 2, generator=gen)
        refs = [torch.randn(4, n, 2, 2, generator=gen) for n in ref_lengths]
        theirs_z = z.clone()
        theirs_mask = upstream["apply_mask_strategy"](theirs_z, [refs], [text], loop, align=align)
        our_z, our_mask = condition_latents(z, [refs], [plan_frames(ours, frames, ref_lengths, loop, align)])
        assert torch.equal(our_z, theirs_z) and torch.equal(our_mask, theirs_mask), (text, frames, loop, align)


def test_loop_condition_equals_upstream_append_generated(upstream):
    class Identity:  # the previous clip is given as a latent already, so "encoding" leaves it as it is
        encode = staticmethod(lambda video: video)

    for length, edit in ((5, 0.0), (8, 0.0), (5, 0.3)):
        clip = torch.randn(1, 4, 15, 2, 2)
        refs, strategies = upstream["append_generated"](Identity, clip, [[clip[0]]], ["0,0,0,0,16"], 1, length, edit)
        ours = (*parse_mask_strategy("0,0,0,0,16"), loop_condition_group(1, len(refs[0]) - 1, length, edit))
        assert ours == parse_mask_strategy(strategies[0])
        assert format_mask_strategy(ours[1:]) == strategies[0].split(";")[1]


def test_prompts_equal_upstream(upstream):
    for name, prompt, loops, *_ in DOC_PROMPTS:
        texts, refs, strategies = upstream["extract_json_from_prompts"]([prompt], ["cli.png"], ["0"])
        ours = parse_conditioned_prompt(prompt, reference_path="cli.png", mask_strategy="0", loops=loops)
        assert ours.text == texts[0] and ours.references == tuple(refs[0].split(";")), name
        assert ours.strategy == parse_mask_strategy(strategies[0]), name
        # As upstream's inference: split into segments, (clean them), merge, then pick each loop's text.
        merged = upstream["merge_prompt"](*upstream["split_prompt"](texts[0]))
        for loop in range(loops):
            assert ours.text_for_loop(loop) == upstream["extract_prompts_loop"]([merged], loop)[0], (name, loop)
    plain = 'a cat{"mask_strategy": "0,0,0,-1"}'
    texts, refs, strategies = upstream["extract_json_from_prompts"]([plain], ["a.png;b.mp4"], ["0"])
    ours = parse_conditioned_prompt(plain, reference_path="a.png;b.mp4", mask_strategy="0")
    assert (ours.text, ";".join(ours.references)) == (texts[0], refs[0])
    assert ours.strategy == parse_mask_strategy(strategies[0])


@pytest.mark.parametrize("bits, mode", [(16, "I;16"), (8, "L")])  # (older Pillow opens 16-bit PNGs as "I")
def test_a_reference_image_keeps_its_tone_at_any_bit_depth(tmp_path, bits, mode):
    # 50% grey: PIL's convert("RGB") clips a 16-bit value at 255, which made this a white frame.
    import numpy as np
    from PIL import Image

    from duca_video.io.media import read_media

    top = 2**bits - 1
    values = np.full((8, 8), (top + 1) // 2, dtype=np.uint16 if bits == 16 else np.uint8)
    image = Image.fromarray(values)
    assert image.mode == mode
    image.save(tmp_path / "grey.png")
    frames = read_media(str(tmp_path / "grey.png"), (8, 8))  # (3, 1, H, W) in [-1, 1]: 50% grey is 0
    assert frames.shape == (3, 1, 8, 8)
    assert frames.abs().max() <= 2 / 255, frames.unique()


def test_a_floating_point_reference_image_is_refused_with_the_reason(tmp_path):
    import numpy as np
    from PIL import Image

    from duca_video.io.media import MediaError, read_media

    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "grey.tif")
    with pytest.raises(MediaError, match="32-bit floating-point image, whose value range is not known"):
        read_media(str(tmp_path / "grey.tif"), (8, 8))
