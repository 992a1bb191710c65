import pytest
import torch
from torch import nn

from duca_video import cache
from duca_video.cache.methods.token import selection as sel
from duca_video.cache.schedule import schedule_table
from tests.helpers import sample, tiny_model

ALL_MODULES = ("attn", "cross", "mlp")


PUBLISHED = {  # step -> (kind, actions for attn/cross/mlp): the published DuCa Open-Sora schedule
    **{s: ("full", "CCC") for s in (0, 1, 2, 6, 12, 18, 24)},
    **{s: ("full", "CRC") for s in (3, 9, 15, 21, 27)},
    **{s: ("conservative", "RRP") for s in range(4, 30, 3)},
    **{s: ("aggressive", "RRR") for s in range(5, 30, 3)},
}


def test_default_duca_schedule_is_the_published_one():
    rows = schedule_table(cache.build_schedule(cache.make_config("duca"), tuple(range(30, 0, -1))))
    got = {int(r["step"]): (r["kind"], r["spatial"]) for r in rows}
    assert got == PUBLISHED
    assert all(r["spatial"] == r["temporal"] for r in rows)


def test_paper_preset_alternates_after_each_fresh_step():
    cfg = cache.make_config("duca", preset="paper")
    assert (cfg.cycle, cfg.recompute_ratio) == (5, 0.1)
    kinds = [r["kind"] for r in schedule_table(cache.build_schedule(cfg, tuple(range(10, 0, -1))))]
    assert kinds == ["full", "conservative", "aggressive", "conservative", "aggressive"] * 2


def test_none_equals_unhooked_model_and_disable_restores():
    model = tiny_model()
    reference = sample(model)
    controller = cache.enable(model, "none")
    torch.testing.assert_close(sample(model), reference, atol=0, rtol=0)
    assert controller.cache_bytes == 0
    cache.enable(model, "duca")
    assert not torch.allclose(sample(model), reference)
    cache.disable(model)
    torch.testing.assert_close(sample(model), reference, atol=0, rtol=0)
    assert all("forward" not in b.__dict__ for b in cache.find_blocks(model))


@pytest.mark.parametrize("frame_mask", [None, torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])])
def test_conservative_step_recomputing_every_token_equals_a_full_step(frame_mask):
    model = tiny_model()
    reference = sample(model, frame_mask=frame_mask)
    cache.enable(
        model,
        "conservative",
        warmup_steps=0,
        cycle=2,
        pattern=("full", "conservative"),
        cross_cycle=1,
        recompute=ALL_MODULES,
        recompute_ratio=1.0,
    )
    out = sample(model, frame_mask=frame_mask)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


def test_each_method_runs_and_caching_changes_the_result():
    model = tiny_model()
    reference = sample(model, steps=8)
    for method in ("duca", "toca", "fora", "aggressive", "conservative", "pab", "teacache"):
        controller = cache.enable(model, method, **({"threshold": (0.0, 2000.0)} if method == "pab" else {}))
        out = sample(model, steps=8)
        assert torch.isfinite(out).all(), method
        kinds = [h["kind"] for h in controller.history]
        assert len(kinds) == 8 and kinds[0] == "full", method
        if method != "teacache":  # teacache may decide to compute everything on a tiny model
            assert not torch.allclose(out, reference), method
        assert method in controller.summary()
    cache.disable(model)


def test_two_prompts_in_sequence_equal_each_run_alone():
    model = tiny_model()
    cache.enable(model, "duca")
    first = sample(model, prompt_seed=1)
    second = sample(model, prompt_seed=2)
    cache.enable(model, "duca")  # a fresh controller
    alone = sample(model, prompt_seed=2)
    torch.testing.assert_close(second, alone, atol=0, rtol=0)
    assert not torch.allclose(first, second)


def test_same_seed_same_video_different_seed_different_selection():
    model = tiny_model()
    cache.enable(model, "duca")
    a, b = sample(model, seed=1), sample(model, seed=1)
    c = sample(model, seed=2)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


def test_cache_keeps_only_what_is_read_in_model_dtype():
    model = tiny_model()
    rows, tokens, width, blocks = 4, 3 * 4 * 5, 64, 4
    per_tensor = rows * tokens * width * 4  # fp32 model
    unfolded = cache.enable(model, "duca", fold=False)
    sample(model, steps=8)
    # Unfolded, the peak is a full step before a conservative one: attn, cross and mlp for every block.
    assert unfolded.cache_bytes == 3 * blocks * per_tensor
    # Folded: one tensor for the conservative step and its recomputed rows (9 of 60 tokens) ...
    rows_bytes = rows * 9 * width * 4 + rows * 9 * 8  # the rows and their int64 indices
    folded = cache.enable(model, "duca")
    sample(model, steps=8)
    assert folded.cache_bytes == blocks * (per_tensor + rows_bytes)
    # ... plus, once step 9 exists, the cross-attention output of step 6 that it reads again.
    sample(model, steps=11)
    assert folded.cache_bytes == blocks * (2 * per_tensor + rows_bytes)
    fora = cache.enable(model, "fora")
    sample(model, steps=8)
    assert 0 < fora.cache_bytes <= 3 * blocks * per_tensor


def test_summary_counts_recomputed_tokens():
    model = tiny_model()
    controller = cache.enable(model, "duca", recompute_ratio=0.5)
    sample(model, steps=6)
    conservative = [h for h in controller.history if h["kind"] == "conservative"]
    assert conservative
    for h in conservative:
        assert h["recomputed"]["mlp"] == h["tokens"]["mlp"] // 2
        assert h["recomputed"]["attn"] == 0
    assert "conservative" in controller.summary()


@pytest.mark.parametrize(
    "selector", ["random", "random_frame", "k_norm", "v_norm", "cross_entropy", "min_similarity", "max_similarity"]
)
def test_every_selector_runs_end_to_end(selector, monkeypatch):
    model = tiny_model()
    picked = []
    real = sel.top_k
    monkeypatch.setattr(sel, "top_k", lambda s, k, valid=None: picked.append(real(s, k, valid)) or picked[-1])
    cache.enable(model, "toca", selector=selector, recompute_ratio=0.25, age_bonus=0.1)
    out = sample(model, steps=5)
    assert torch.isfinite(out).all()
    assert picked and all(i.shape == (4, 15) for i in picked)  # 25% of 60 tokens, 4 CFG rows
    assert all(len(set(row.tolist())) == 15 for i in picked for row in i)


def test_selectors_pick_the_requested_number_of_valid_tokens():
    scores = sel.random_scores(4, 20, True, (0, 5), 3, 1)
    assert torch.equal(scores[:2], scores[2:])  # the CFG halves share one draw
    assert not torch.equal(scores[0], scores[1])  # two videos, two seeds
    assert torch.equal(sel.random_scores(2, 20, True, (5,), 3, 1)[0], scores[1])  # a video's draw is its own
    valid = torch.ones(4, 20, dtype=torch.bool)
    valid[:, 15:] = False
    idx = sel.top_k(scores, 6, valid)
    assert idx.shape == (4, 6) and int(idx.max()) < 15
    assert all(len(set(r.tolist())) == 6 for r in idx)
    with pytest.raises(ValueError, match="only 15 valid"):
        sel.top_k(scores, 16, valid)
    frame = sel.random_frame_scores(2, 4, 5, False, (0, 1), 3, 1)
    counts = torch.bincount(sel.top_k(frame, 8)[0] // 5, minlength=4)
    assert counts.tolist() == [2, 2, 2, 2]
    x = torch.randn(2, 30, 8)
    gens = sel.row_generators((0, 1), 3, 1, 2, False)
    assert sel.top_k(sel.similarity_scores(x, 0.05, True, gens), 10).shape == (2, 10)
    ent = sel.attention_entropy(torch.randn(2, 30, 8), torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), 2)
    assert ent.shape == (2, 30) and bool((ent >= 0).all()) and bool((ent <= torch.log(torch.tensor(5.0))).all())


def test_unknown_method_and_field_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown cache method 'dcua'.*duca"):
        cache.enable(model, "dcua")
    with pytest.raises(ValueError, match="no field.*'cylce'"):
        cache.enable(model, "duca", cylce=4)
    with pytest.raises(ValueError, match="recompute_ratio"):
        cache.enable(model, "duca", recompute_ratio=1.5)
    with pytest.raises(ValueError, match="pattern"):
        cache.enable(model, "duca", cycle=2)
    with pytest.raises(ValueError, match="preset"):
        cache.enable(model, "duca", preset="fast")
    with pytest.raises(ValueError, match="no STDiT3 blocks"):
        cache.enable(nn.Linear(2, 2), "duca")


# The plugin on upstream Open-Sora's own STDiT3 and sampler: tests/test_upstream_plugin.py.


# Folding applies when a full step's outputs have a single conservative reader (DuCa's published schedule);
# ToCa and the paper preset read them twice, so they keep the separate tensors.
FOLD_CASES = [
    ("duca", {}, True),
    ("duca", {"selector": "k_norm"}, True),
    ("toca", {}, False),
    ("duca", {"preset": "paper"}, False),
]


@pytest.mark.parametrize("method, extra, smaller", FOLD_CASES)
def test_folded_cache_gives_the_same_result_with_less_memory(method, extra, smaller):
    model = tiny_model()
    unfolded = cache.enable(model, method, fold=False, **extra)
    expected = sample(model, steps=10)
    folded = cache.enable(model, method, **extra)
    out = sample(model, steps=10)
    # Folding sums the same terms in another order: fp32 rounding after 10 steps reaches ~1e-5 (seen 1.2e-5).
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=1e-4)
    assert (folded.cache_bytes < unfolded.cache_bytes) if smaller else (folded.cache_bytes == unfolded.cache_bytes)
    assert [h["recomputed"] for h in folded.history] == [h["recomputed"] for h in unfolded.history]


def test_every_registered_method_is_exported_with_its_config():
    configs = {cls for name, cls in vars(cache).items() if name.endswith("Config") and isinstance(cls, type)}
    assert set(cache.METHODS.values()) <= configs, set(cache.METHODS.values()) - configs


def test_step_records_round_trip_their_labels_and_replay_their_decisions():
    from duca_video.cache.records import StepKind, StepRecord

    for label in ("full", "conservative", "aggressive", "mixed:1011", "first_block", "first_block:01"):
        assert StepRecord.parse(label).label == label
    mixed = StepRecord.skipped(False, [True, False])
    assert (mixed.kind, mixed.label) == (StepKind.MIXED, "mixed:10")
    assert mixed.computes(after_first_block=False, videos=2) == [True, False]
    assert mixed.computes(after_first_block=True, videos=2) is True  # the stack ran for the computing video
    assert StepRecord.skipped(True, [False, False]).label == "first_block"
    assert StepRecord.parse("first_block").computes(after_first_block=False, videos=2) is True
    assert StepRecord.parse("first_block").computes(after_first_block=True, videos=2) is False
    assert StepRecord.parse("aggressive").computes(after_first_block=False, videos=2) is False
