"""EasyCache on the shipped testbed model (configs/tiny.py, batch 2, CFG on), through the pipeline's own loader and
generator, the CLI, the FLOP replay and 2 sequence-parallel ranks (per-video decisions and the upstream instance:
tests/test_per_video_decisions.py and tests/test_upstream_plugin.py list it with the other methods).

It was added as one file (`duca_video/cache/methods/easycache.py`) and one registry name, no engine file touched."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import (
    TINY_CONFIG,
    TINY_STEPS,
    TWO_PROMPTS,
    counted_tiny_loop,
    generate_tiny_batch,
    inference_main,
    load_tiny_batch,
)
from tests.torchrun import run_workers


def kinds(models) -> str:
    return "".join(
        "F" if h["kind"] == "full" else "A" if h["kind"] == "aggressive" else "m" for h in models.controller.history
    )


@pytest.fixture(scope="module")
def reference():
    return generate_tiny_batch("none")[0].latents


def test_threshold_zero_computes_every_step_and_equals_none_bitwise(reference):
    out, models = generate_tiny_batch("easycache", "threshold=0")
    assert kinds(models) == "F" * TINY_STEPS
    assert torch.equal(out.latents, reference)


def test_a_large_threshold_skips_all_but_the_warm_up_and_the_last_step(reference):
    out, models = generate_tiny_batch("easycache", "threshold=1e9", "warmup_steps=2")
    assert kinds(models) == "FF" + "A" * (TINY_STEPS - 3) + "F"
    assert not torch.equal(out.latents, reference) and torch.isfinite(out.latents).all()
    # Three stack tensors held (the last computed step's input and output, the previous step's input).
    tokens = 2 * (16 // 2) * (16 // 2)  # 8 frames / 4, 16x16 / (2x2)
    assert out.cache_bytes == 3 * (2 * 2 * tokens * models.model.config.hidden_size * 4)
    # The estimate accumulates from step to step while the stack is skipped: rate x input change / output size.
    signals = [h["signal"] for h in models.controller.history[2:-1]]
    for video in range(2):
        values = [s[video] for s in signals]
        assert all(b > a > 0 for a, b in zip(values, values[1:])), values


def test_a_skipped_step_adds_the_last_computed_transformation_to_its_input():
    cfg, models, jobs = load_tiny_batch("easycache", "threshold=1e9", "warmup_steps=2")
    blocks, seen = models.controller.blocks, []
    blocks[0].register_forward_pre_hook(lambda _m, args: seen.append({"in": args[0]}))
    blocks[-1].register_forward_hook(lambda _m, _a, out: seen[-1].__setitem__("out", out))
    from duca_video import pipeline

    pipeline.generate(models, cfg, jobs, False)
    last = seen[1]  # the second warm-up step, the last computed before the skips
    for step in seen[2:-1]:
        torch.testing.assert_close(step["out"], step["in"] + (last["out"] - last["in"]), atol=1e-5, rtol=1e-5)


def test_the_flop_count_replays_the_decisions():
    _, models, _ = load_tiny_batch("easycache", "threshold=0.2", "warmup_steps=2", flops=True)
    decided, counted, count = counted_tiny_loop(models)
    assert any(k != "full" for k in decided) and "full" in decided[2:-1], decided
    assert count(decided) == counted > 0


def test_cli_generates_with_easycache_and_records_its_settings(tmp_path):
    def cli(name: str, *flags: str) -> int:
        return inference_main(
            [
                "--config",
                str(TINY_CONFIG),
                "--save-dir",
                str(tmp_path / name),
                "--quiet",
                "--prompt",
                *TWO_PROMPTS,
                "--batch-size",
                "2",
                "--num-sampling-steps",
                str(TINY_STEPS),
                *flags,
            ]
        )

    assert cli("none", "--cache", "none") == 0
    assert cli("ec", "--cache", "easycache", "--cache-opt", "threshold=0.2", "--cache-opt", "warmup_steps=2") == 0
    for i in range(2):
        base = json.loads((tmp_path / "none" / f"sample_{i:04d}.json").read_text())
        record = json.loads((tmp_path / "ec" / f"sample_{i:04d}.json").read_text())
        assert record["method"] == "easycache" and record["method_config"] == {"threshold": 0.2, "warmup_steps": 2}
        assert 0 < record["dit_tflops"] < base["dit_tflops"]


@pytest.mark.parametrize("opt, field", [("threshold=-1", "threshold"), ("warmup_steps=1", "warmup_steps")])
def test_bad_settings_are_clear_errors(tmp_path, capsys, opt, field):
    argv = [
        "--config",
        str(TINY_CONFIG),
        "--save-dir",
        str(tmp_path),
        "--prompt",
        TWO_PROMPTS[0],
        "--cache",
        "easycache",
        "--cache-opt",
        opt,
    ]
    assert inference_main(argv) == 2
    err = capsys.readouterr().err
    assert "easycache" in err and field in err and "allowed" in err, err


@pytest.mark.multiprocess
def test_two_sequence_parallel_ranks_decide_as_one_process(tmp_path):
    threshold = 0.07  # about 0.02 per skipped step here: 3 skips, then a computed step
    reports = run_workers("decisions_worker.py", 2, tmp_path, "easycache", str(threshold), "warmup_steps=2")
    single = reports[0]["kinds_single"]
    assert "full" in single[2:-1] and any(k != "full" for k in single), single  # the threshold splits the steps
    for report in reports:
        assert report["kinds_sp"] == report["kinds_single"] == single
        assert report["max_diff"] <= 1e-5
        pairs = [
            (a, b)
            for sp, one in zip(report["signals_sp"], report["signals_single"])
            if sp is not None
            for a, b in zip(sp, one)
            if a is not None
        ]
        assert pairs and all(abs(a - b) < 1e-6 and abs(a - threshold) > 1e-3 for a, b in pairs)
