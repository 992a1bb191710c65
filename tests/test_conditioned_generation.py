"""Image- and video-conditioned generation end to end on the shipped tiny model (configs/tiny.py, PixelVAE, CPU).

With the PixelVAE a latent frame *is* a frame, so "the reference frame is kept" can be checked exactly on the
saved latent (and the decoded video), and as a PSNR on the mp4 (which adds the codec's loss).
"""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from duca_video import cache
from duca_video.io import write_video
from duca_video.io.media import read_media
from duca_video.metrics.fidelity import psnr
from duca_video.models import STDiT3, STDiT3Config
from duca_video.sampling.rflow import RFlowSampler
from duca_video.testbed import PixelVAE
from duca_video.testbed.data import Clip, DataConfig, render
from duca_video.testbed.tiny import load_tiny

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "inference.py"
TINY = ROOT / "configs" / "tiny.py"
RED = "a large red square moving left on a dark background"
BLUE = "a small blue circle moving up on a light background"
main = runpy.run_path(str(SCRIPT), run_name="inference_cli")["main"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _clip(config: DataConfig, **fields) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1]: one testbed clip (a shape moving over a background)."""
    values = {
        "shape": "square",
        "colour": "red",
        "radius": 3.0,
        "direction": "left",
        "speed": 1.0,
        "background": "dark",
        "size": "large",
        "speed_word": "",
        "start": (10.0, 8.0),
    }
    clip = Clip(**{**values, **fields})
    return render([clip], config)[0]


def _uint8(x: torch.Tensor) -> np.ndarray:
    return x.clamp(-1, 1).add(1).div(2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict[str, Path]:
    """A PNG of another size than the video (20x24: resized and cropped to 16x16) and an 8-frame mp4."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("refs")
    image = _clip(DataConfig(num_frames=2, height=20, width=24), start=(12.0, 10.0))[:, 0]
    Image.fromarray(_uint8(image).transpose(1, 2, 0)).save(folder / "start.png")
    video = _clip(DataConfig(num_frames=8, height=16, width=16))
    write_video(folder / "given.mp4", torch.from_numpy(_uint8(video)).permute(1, 2, 3, 0).contiguous(), 8)
    return {"image": folder / "start.png", "video": folder / "given.mp4"}


def _run(tmp_path: Path, save: str, *flags: str, steps: int = 6) -> Path:
    code = main(
        [
            "--config",
            str(TINY),
            "--save-dir",
            str(tmp_path / save),
            "--quiet",
            "--save-latents",
            "--num-sampling-steps",
            str(steps),
            *flags,
        ]
    )
    assert code == 0
    return tmp_path / save


def _latent(folder: Path, name: str = "sample_0000") -> torch.Tensor:
    return load_file(str(folder / f"{name}.latent.safetensors"))["latent"]


def _mp4(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.slow
def test_image_to_video_keeps_the_reference_with_and_without_caching_in_any_batch(tmp_path, refs):
    ref = read_media(str(refs["image"]), (16, 16))  # (3, 1, 16, 16), as the pipeline reads it
    # One value per prompt: prompt 1 moves the image to the last frame with its own JSON, prompt 2 is plain.
    prompts = [RED, BLUE + '{"mask_strategy": "0,0,0,-1"}', BLUE]
    image = str(refs["image"])
    flags = ["--prompt", *prompts, "--reference-path", image, image, "", "--mask-strategy", "0", "0", ""]
    runs = {
        method: _run(tmp_path, method, *flags, "--cache", method, "--batch-size", "3") for method in ("none", "duca")
    }
    for method, folder in runs.items():
        plain = _run(tmp_path, f"plain_{method}", "--prompt", RED, BLUE, BLUE, "--batch-size", "3", "--cache", method)
        first, last = _latent(folder, "sample_0000"), _latent(folder, "sample_0001")
        assert torch.equal(first[:, :1], ref) and torch.equal(last[:, -1:], ref), method
        # The decoded video (PixelVAE: clamp to [-1, 1]) keeps it exactly: infinite PSNR before the codec.
        assert psnr(ref, PixelVAE().decode(first[None])[0, :, :1], 2.0) == float("inf")
        video = _mp4(folder / "sample_0000.mp4")
        assert video.shape == (8, 16, 16, 3)
        target = torch.from_numpy(_uint8(ref[:, 0]).transpose(1, 2, 0)).float()
        kept = psnr(target, torch.from_numpy(video[0]).float(), 255)
        free = psnr(target, torch.from_numpy(_mp4(plain / "sample_0000.mp4")[0]).float(), 255)
        print(f"{method}: PSNR of mp4 frame 0 vs the reference {kept:.2f} dB (text-to-video: {free:.2f} dB)")
        assert kept > 25 and kept > free + 5, (method, kept, free)
        # The plain prompt in the same batch is the plain run's video.
        torch.testing.assert_close(_latent(folder, "sample_0002"), _latent(plain, "sample_0002"), atol=1e-5, rtol=0)
        record = json.loads((folder / "sample_0000.json").read_text())
        assert record["frames"] == 8 and record["identity"]["conditioning"]["mask_strategy"] == "0,0,0,0,1,0.0"
        assert "conditioning" not in json.loads((folder / "sample_0002.json").read_text())["identity"]
    assert not torch.equal(_latent(runs["none"])[:, 1:], _latent(runs["duca"])[:, 1:])  # caching did run
    one = _run(tmp_path, "duca_b1", *flags, "--cache", "duca", "--batch-size", "1")
    for name in ("sample_0000", "sample_0001", "sample_0002"):  # batch 3 with DuCa on = each video alone
        torch.testing.assert_close(_latent(one, name), _latent(runs["duca"], name), atol=1e-5, rtol=0)


def test_video_extension_continues_the_given_frames(tmp_path, refs):
    given = read_media(str(refs["video"]), (16, 16))  # the mp4 as decoded: (3, 8, 16, 16)
    # The last 4 frames of the given video open the new one; the model continues from them.
    out = _latent(
        _run(
            tmp_path,
            "ext",
            "--prompt",
            RED,
            "--reference-path",
            str(refs["video"]),
            "--mask-strategy",
            "0,0,-4,0,4",
            "--cache",
            "duca",
        )
    )
    assert out.shape == (3, 8, 16, 16) and torch.equal(out[:, :4], given[:, 4:])
    # The generated frames follow on: the first one is closer to the last given frame than to the first.
    assert psnr(given[:, 7], out[:, 4], 2.0) > psnr(given[:, 0], out[:, 4], 2.0)


@pytest.mark.slow
def test_loop_appends_segments_of_the_requested_length_with_per_segment_prompts(tmp_path):
    prompt = f"|0|{RED}|1|{BLUE}"
    looped = _run(tmp_path, "loop", "--prompt", prompt, "--loop", "3", "--condition-frame-length", "4")
    latent = _latent(looped)
    assert latent.shape == (3, 8 + 4 + 4, 16, 16)  # upstream's concatenation: later clips drop the kept frames
    assert _mp4(looped / "sample_0000.mp4").shape[0] == 16
    # Clip 0 is the loop-0 text's own video (same seed, no reference frames).
    first = _latent(_run(tmp_path, "first", "--prompt", RED))
    torch.testing.assert_close(latent[:, :8], first, atol=1e-5, rtol=0)
    identity = json.loads((looped / "sample_0000.json").read_text())["identity"]["conditioning"]
    assert identity["texts"] == [RED, BLUE, BLUE] and identity["loop"] == 3
    assert identity["condition_frame_length"] == 4


def _recompute_all_vs_full(model, z, y, mask, model_kwargs, frames: int) -> float:
    """max |conservative steps recomputing every token - uncached| over a sampling run with reference frames."""
    sampler = RFlowSampler(num_sampling_steps=9, use_timestep_transform=False, cfg_scale=4.0)
    y_null = model.y_embedder.y_embedding[None, None].expand_as(y)
    frame_mask = torch.ones(2, frames)
    frame_mask[0, 0], frame_mask[1, 2:4] = 0.0, 0.3  # a kept frame; edited frames released mid-way

    def sample():
        return sampler.sample(
            model, z, y, y_null, mask, model_kwargs=model_kwargs, frame_mask=frame_mask, progress=False, seed=[1, 2]
        )

    full = sample()
    assert torch.equal(full[0, :, 0], z[0, :, 0])  # the reference frame is kept
    controller = cache.enable(
        model,
        "duca",
        pattern=("full", "conservative", "conservative"),
        cross_cycle=1,
        recompute=("attn", "cross", "mlp"),
        recompute_ratio=1.0,
    )
    try:
        recomputed = sample()
        assert "conservative" in [h["kind"] for h in controller.history]
    finally:
        cache.disable(model)
    return (recomputed - full).abs().max().item()


def test_conservative_step_recomputing_every_token_equals_a_full_step_with_reference_frames():
    # Open-Sora's patch (1, 2, 2): one time token per latent frame.
    torch.manual_seed(0)
    config = STDiT3Config(
        depth=2,
        hidden_size=64,
        num_heads=4,
        patch_size=(1, 2, 2),
        in_channels=3,
        caption_channels=32,
        model_max_length=8,
        pred_sigma=False,
    )
    model = STDiT3(config).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    y, mask = torch.randn(2, 1, 8, 32, generator=g), torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    z = torch.randn(2, 3, 6, 8, 8, generator=g)
    kwargs = {key: torch.full((2,), value) for key, value in (("fps", 8.0), ("height", 16.0), ("width", 16.0))}
    with torch.no_grad():
        assert _recompute_all_vs_full(model, z, y, mask, kwargs, 6) <= 1e-5


def test_same_on_the_tiny_model_whose_temporal_patch_is_4():
    # A time token spans 4 latent frames there: it is clean (t0) only when all 4 are kept.
    bed = load_tiny()
    text = bed.text_encoder.encode([RED, BLUE])
    z = torch.randn(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _recompute_all_vs_full(bed.model, z, text["y"], text["mask"], bed.model_kwargs(2), 8) <= 1e-5


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reference-path", "missing.png", "--mask-strategy", "0"], "reference 0: reference 'missing.png' does not"),
        (
            ["--reference-path", "{video}", "--mask-strategy", "0,0,8"],
            "mask_strategy: group 1 ('0,0,8,0,1,0.0'): reference start 8 is outside the reference (8 latent frames",
        ),
        (["--reference-path", "{image}", "--mask-strategy", "0,0,0,-9"], "target start -9 is outside the video"),
        (["--reference-path", "{image}", "--mask-strategy", "0,1"], "reference index 1 does not exist"),
        (["--reference-path", "{bad}", "--mask-strategy", "0"], "cannot be read as an image"),
        (
            ["--reference-path", "{image}", "{image}", "--mask-strategy", "0"],
            "--reference-path / reference_path: 2 values for 1 prompt(s)",
        ),
        (["--loop", "2", "--condition-frame-length", "9"], "--condition-frame-length 9 leaves no new frame for a loop"),
        # A loop whose condition covers the whole clip adds no frame at twice the cost.
        (
            ["--loop", "2", "--condition-frame-length", "8"],
            "it must be less than the clip's 8 latent frames; allowed: 1..7",
        ),
        (["--loop", "1001"], "loop=1001 is not allowed: at most 1000 clips per video"),
        (["--condition-frame-edit", "1.5"], "condition_frame_edit=1.5 is not allowed"),
    ],
)
def test_bad_conditioning_input_is_named_before_any_model_loads(tmp_path, refs, capsys, monkeypatch, flags, message):
    from duca_video import pipeline

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    paths = {"image": str(refs["image"]), "video": str(refs["video"]), "bad": str(bad)}
    monkeypatch.setattr(pipeline, "load_models", lambda *a, **k: pytest.fail("models loaded before the check"))
    code = main(
        [
            "--config",
            str(TINY),
            "--save-dir",
            str(tmp_path / "out"),
            "--prompt",
            RED,
            "--quiet",
            *[f.format(**paths) for f in flags],
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_notices_a_changed_reference(tmp_path, refs):
    image = tmp_path / "ref.png"
    image.write_bytes(refs["image"].read_bytes())
    flags = ["--prompt", RED, "--reference-path", str(image), "--mask-strategy", "0", "--num-sampling-steps", "3"]
    _run(tmp_path, "out", *flags)
    code = main(["--config", str(TINY), "--save-dir", str(tmp_path / "out"), "--quiet", "--save-latents", *flags])
    assert code == 0  # unchanged: skipped as complete
    from PIL import Image

    Image.new("RGB", (16, 16), (0, 0, 255)).save(image)
    assert main(["--config", str(TINY), "--save-dir", str(tmp_path / "out"), "--quiet", "--save-latents", *flags]) == 2


def test_conditioning_fidelity_compares_cached_with_uncached_videos_that_keep_the_reference():
    from duca_video.metrics.conditioning_bench import conditioning_fidelity

    report = conditioning_fidelity(["none", "duca", "fora"], num_videos=2, num_steps=9)
    methods = report["methods"]
    assert methods["none"]["psnr_vs_none"] == float("inf") and methods["none"]["ssim_vs_none"] == 1.0
    for name in ("duca", "fora"):  # cached: close to the uncached video, but not equal to it
        assert 20 < methods[name]["psnr_vs_none"] < float("inf") and 0.7 < methods[name]["ssim_vs_none"] < 1.0
        assert methods[name]["kept_psnr"] == float("inf")  # the reference frame is kept exactly
    assert report["config"]["mask_strategy"] == "0"


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _launch(tmp_path: Path, save: str, nproc: int, *flags: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    args = ["--config", str(TINY), "--save-dir", str(tmp_path / save), "--quiet", "--save-latents", *flags]
    done = subprocess.run([*launcher, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / save


@pytest.mark.multiprocess
def test_sequence_and_data_parallel_give_the_one_process_videos(tmp_path, refs):
    pytest.importorskip("colossalai")
    # Image to video with DuCa (tiny.py's method), a loop of 2 (the previous clip is broadcast to the SP group
    # and encoded on every rank), per-prompt strategies, batches of 2.
    flags = [
        "--prompt",
        RED,
        BLUE + '{"mask_strategy": "0,0,0,-1"}',
        "--reference-path",
        str(refs["image"]),
        "--mask-strategy",
        "0",
        "--loop",
        "2",
        "--condition-frame-length",
        "4",
        "--batch-size",
        "2",
    ]
    single = _launch(tmp_path, "single", 1, *flags)
    for other in (
        _launch(tmp_path, "sp", 2, *flags, "--sp-size", "2"),
        _launch(tmp_path, "dp", 2, *flags, "--sp-size", "1", "--batch-size", "1"),
    ):
        for name in ("sample_0000", "sample_0001"):
            ref, theirs = _latent(single, name), _latent(other, name)
            assert ref.shape == (3, 12, 16, 16)
            torch.testing.assert_close(theirs, ref, atol=1e-5, rtol=0)
        records = [json.loads((other / f"{n}.json").read_text()) for n in ("sample_0000", "sample_0001")]
        assert {r["world_size"] for r in records} == {2} and records[0]["frames"] == 12
