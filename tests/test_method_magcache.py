"""MagCache on the trained testbed model (weights/tiny): the static plan from calibrated magnitude ratios, the
residual reuse, the calibration file (made by the calibration CLI), resampling to other step counts, the CLI,
FLOP replay and sequence parallelism (2 gloo ranks)."""

import dataclasses
import json
import logging
import math
import runpy
from pathlib import Path

import pytest
import torch

from duca_video import cache
from duca_video.cache.methods.magcache import (
    OPEN_SORA_12_RATIOS,
    read_ratios_file,
    resample_ratios,
    skip_decisions,
)
from duca_video.cache.methods.magcache_calibrate import MagCalibrationConfig
from duca_video.cache.methods.magcache_calibrate import main as calibrate_main
from duca_video.testbed.tiny import load_tiny
from tests.torchrun import run_workers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
SHIPPED = ROOT / "weights" / "tiny" / "magcache.json"
PROMPTS = ["a large red square moving left on a dark background", "a small blue circle moving up on a light background"]
STEPS = 10
# Ratios that make MagCache skip a few steps of a 10-step run (the tiny model's own, shipped ones, may not).
RATIOS = (1.0, 0.9, 0.95, 0.99, 0.995, 1.0, 0.99, 0.98, 0.97, 0.85)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def bed():
    return load_tiny()


def generate(bed, steps=STEPS):
    sampler = dataclasses.replace(bed.sampler, num_sampling_steps=steps)
    return bed.generate(PROMPTS, [3, 4], sampler)  # 2 videos, CFG on: 4 model rows


def test_decisions_follow_the_magnitude_rule():
    # 0.2 * 10 = 2 retained steps; then s = 0.95 (E .05), 0.9405 (E .1095), 0.9358 (E .1737 >= .12: compute).
    assert skip_decisions(RATIOS, 0.12, 3, 0.2) == [False, False, True, True, False, True, True, True, False, False]
    assert skip_decisions(RATIOS, 0.12, 1, 0.2) == [False, False, True, False, True, False, True, False, True, False]
    assert not any(skip_decisions(RATIOS, 0.0, 3, 0.2))  # strict: even a ratio of exactly 1 does not skip
    assert not any(skip_decisions((1.0,) * 8, 1.0, 3, 1.0))  # everything retained
    # The published Open-Sora 1.2 setting (0.12, K=3, first 6 of 30): its ratios are so close to 1 that K binds,
    # three skips after each computed step from step 6 on.
    skips = skip_decisions(OPEN_SORA_12_RATIOS, 0.12, 3, 0.2)
    assert [s for s in range(30) if skips[s]] == [s for s in range(6, 30) if (s - 6) % 4 != 3]
    plan = cache.build_schedule(cache.make_config("magcache"), tuple(range(30, 0, -1)))
    assert [p.kind == "aggressive" for p in plan] == skips


def test_threshold_zero_is_none_bitwise_and_a_threshold_skips(bed):
    reference = generate(bed)
    controller = cache.enable(bed.model, "magcache", threshold=0.0, ratios=RATIOS)
    try:
        torch.testing.assert_close(generate(bed), reference, atol=0, rtol=0)
        assert {h["kind"] for h in controller.history} == {"full"} and controller.cache_bytes == 0
        controller = cache.enable(bed.model, "magcache", ratios=RATIOS)
        out = generate(bed)
    finally:
        cache.disable(bed.model)
    kinds = [h["kind"] for h in controller.history]
    assert kinds == ["aggressive" if s else "full" for s in skip_decisions(RATIOS, 0.12, 3, 0.2)]
    diff = (out - reference).abs()
    assert diff.max() > 0 and diff.mean() < 0.1, diff.mean()  # skipped steps change the video, not ruin it
    assert controller.cache_bytes > 0


def _stack_io(model):
    """Forward hooks: per model call, the first block's input and the last block's output."""
    blocks = cache.find_blocks(model)
    seen = {"in": [], "out": []}
    handles = [
        blocks[0].register_forward_hook(lambda _m, args, _o: seen["in"].append(args[0])),
        blocks[-1].register_forward_hook(lambda _m, _a, out: seen["out"].append(out)),
    ]
    return seen, handles


def test_skipped_steps_add_the_last_computed_residual_and_hold_one_tensor(bed):
    controller = cache.enable(bed.model, "magcache", ratios=RATIOS)
    seen, handles = _stack_io(bed.model)
    try:
        generate(bed)
    finally:
        for h in handles:
            h.remove()
        cache.disable(bed.model)
    kinds = [h["kind"] for h in controller.history]
    assert kinds.count("aggressive") == 5
    last_residual = None
    for step, kind in enumerate(kinds):
        x, out = seen["in"][step], seen["out"][step]
        if kind == "aggressive":
            torch.testing.assert_close(out, x + last_residual, atol=0, rtol=0)
        else:
            last_residual = out - x
    # One stack residual (rows x tokens x hidden, fp32) is the whole cache.
    assert controller.cache_bytes == seen["in"][0].numel() * 4


def test_calibration_policy_changes_nothing_and_records_the_norm_ratios(bed):
    reference = generate(bed, steps=6)
    config = MagCalibrationConfig()
    cache.enable(bed.model, config)
    seen, handles = _stack_io(bed.model)
    try:
        torch.testing.assert_close(generate(bed, steps=6), reference, atol=0, rtol=0)
    finally:
        for h in handles:
            h.remove()
        cache.disable(bed.model)
    ((videos, ratios),) = config.records
    norms = [(o - i).norm(dim=-1) for i, o in zip(seen["in"], seen["out"])]
    expected = [1.0] + [(b / a).mean().item() for a, b in zip(norms, norms[1:])]
    assert videos == 2 and len(ratios) == 6
    assert ratios == pytest.approx(expected, rel=1e-6)


def test_calibration_file_round_trip_and_use(tmp_path):
    out = tmp_path / "mag.json"
    code = calibrate_main(
        ["--config", str(TINY), "--prompts", "3", "--out", str(out), "--num-sampling-steps", "6", "--batch-size", "2"]
    )
    assert code == 0
    data = read_ratios_file(out)
    assert data["num_steps"] == 6 and data["prompts"] == 3 and len(data["prompt_texts"]) == 3
    assert data["ratios"][0] == 1.0 and all(0 < r < 10 for r in data["ratios"])
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temporary left
    from_file = cache.make_config("magcache", ratios_path=str(out), threshold=0.5)
    inline = cache.make_config("magcache", ratios=tuple(data["ratios"]), threshold=0.5)
    timesteps = tuple(float(t) for t in range(6, 0, -1))
    kinds = [p.kind for p in cache.build_schedule(from_file, timesteps)]
    assert kinds == [p.kind for p in cache.build_schedule(inline, timesteps)]
    assert kinds == ["aggressive" if s else "full" for s in skip_decisions(tuple(data["ratios"]), 0.5, 3, 0.2)]


def test_the_shipped_tiny_calibration_is_a_valid_30_step_file():
    data = read_ratios_file(SHIPPED)
    assert data["num_steps"] == 30 and data["prompts"] >= 16
    assert data["ratios"][0] == 1.0


def test_a_file_for_another_step_count_is_resampled(tmp_path, caplog):
    # Constant per-step ratio g over 30 gaps; 15 gaps must each compound two: g**2.
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"num_steps": 31, "ratios": [1.0] + [0.98] * 30}))
    config = cache.make_config("magcache", ratios_path=str(path))
    with caplog.at_level(logging.WARNING):
        ratios = config.step_ratios(16)
    assert "calibrated for 31 steps, resampled for 16" in caplog.text
    assert ratios[0] == 1.0 and ratios[1:] == pytest.approx([0.98**2] * 15)
    assert resample_ratios(RATIOS, len(RATIOS)) == RATIOS
    # The total change from the first to the last step is kept for any curve.
    for n in (4, 7, 23):
        assert math.prod(resample_ratios(RATIOS, n)) == pytest.approx(math.prod(RATIOS))
    plan = cache.build_schedule(config, tuple(range(16, 0, -1)))
    assert len(plan) == 16 and plan[0].kind == "full"


def test_bad_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="ratios_path=.*no such file.*magcache_calibrate"):
        cache.make_config("magcache", ratios_path=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_steps": 3, "ratios": [1.0, 0.9]}))
    with pytest.raises(ValueError, match="num_steps=3 but 2 ratios"):
        cache.make_config("magcache", ratios_path=str(bad))
    with pytest.raises(ValueError, match="one source of ratios"):
        cache.make_config("magcache", ratios_path=str(SHIPPED), ratios=(1.0, 0.9))
    for field, value in (("threshold", -1.0), ("max_skips", -1), ("retention_ratio", 1.5), ("ratios", (1.0, -2.0))):
        with pytest.raises(ValueError, match=f"{field}="):
            cache.make_config("magcache", **{field: value})


def test_cli_runs_magcache_with_a_ratios_file(tmp_path):
    main = runpy.run_path(str(ROOT / "scripts" / "inference.py"), run_name="inference_cli")["main"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"num_steps": STEPS, "ratios": list(RATIOS)}))
    save = tmp_path / "out"
    code = main(
        [
            "--config",
            str(TINY),
            "--save-dir",
            str(save),
            "--quiet",
            "--num-sampling-steps",
            str(STEPS),
            "--batch-size",
            "2",
            "--prompt",
            *PROMPTS,
            "--cache",
            "magcache",
            "--cache-opt",
            f"ratios_path={path}",
        ]
    )
    assert code == 0
    records = [json.loads(p.read_text()) for p in sorted(save.glob("*.json"))]
    assert len(records) == 2 and all(r["method"] == "magcache" for r in records)
    assert records[0]["method_config"]["ratios_path"] == str(path)
    assert len(list(save.glob("*.mp4"))) == 2
    code = main(
        [
            "--config",
            str(TINY),
            "--save-dir",
            str(save),
            "--quiet",
            "--prompt",
            PROMPTS[0],
            "--cache",
            "magcache",
            "--cache-opt",
            f"ratios_path={tmp_path / 'nope.json'}",
        ]
    )
    assert code == 2


def test_flop_replay_counts_only_the_computed_steps():
    from tests.helpers import real_and_replayed

    real, replayed, kinds = real_and_replayed("magcache", ratios=RATIOS)
    assert kinds.count("aggressive") == 5 and replayed == real
    none, _, _ = real_and_replayed("none")
    assert 0.4 < real / none < 0.6  # 5 of 10 steps skip the stack (embedders and final layer still run)


@pytest.mark.multiprocess
def test_sequence_parallel_two_ranks_match_one_process(tmp_path):
    pytest.importorskip("colossalai")
    for report in run_workers("magcache_worker.py", 2, tmp_path):
        assert report["max_diff"] <= 1e-5, report
        assert report["sp_history"] == report["single_history"]
        assert report["sp_history"].count("aggressive") == 5
        assert report["skipped_step_calls"] == 0  # a skipped step runs no block, so no collective
