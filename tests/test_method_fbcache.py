"""First-Block Cache on the shipped testbed model (configs/tiny.py, batch 2, CFG on), through the pipeline's own
loader and generator, the CLI, the FLOP replay, and 2 sequence-parallel ranks."""

import json

import pytest
import torch

from duca_video import pipeline
from duca_video.cache.state import STACK
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

TINY, PROMPTS, STEPS = TINY_CONFIG, TWO_PROMPTS, TINY_STEPS
load, generate, main = load_tiny_batch, generate_tiny_batch, inference_main


def kinds(models) -> str:
    return "".join({"full": "F", "first_block": "1"}[h["kind"]] for h in models.controller.history)


@pytest.fixture(scope="module")
def reference():
    return generate("none")[0].latents


def test_threshold_zero_computes_every_step_and_equals_none_bitwise(reference):
    out, models = generate("fbcache", "threshold=0")
    assert kinds(models) == "F" * STEPS
    assert torch.equal(out.latents, reference)


def test_a_large_threshold_skips_every_step_but_the_forced_ones(reference):
    out, models = generate("fbcache", "threshold=1e9", "warmup_steps=2")
    assert kinds(models) == "FF" + "1" * (STEPS - 3) + "F"  # warm-up, then the last step computed
    assert not torch.equal(out.latents, reference) and torch.isfinite(out.latents).all()
    # Two stack tensors held (block 0's residual and the rest's): 2 videos x CFG x tokens x width, fp32.
    model = models.model
    tokens = 2 * (16 // 2) * (16 // 2)  # 8 frames / 4, 16x16 / (2x2)
    assert out.cache_bytes == 2 * (2 * 2 * tokens * model.config.hidden_size * 4)
    _, capped = generate("fbcache", "threshold=1e9", "max_skips=2", "compute_last=False")
    assert kinds(capped) == "F11F11F11F"[:STEPS]


def test_a_skipped_step_is_first_block_output_plus_the_rest_residual_of_the_last_computed_step():
    cfg, models, jobs = load("fbcache", "threshold=1e9")
    blocks, seen = models.controller.blocks, []  # per forward: block 0's input and output, the stack output
    mlp_calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.mlp.register_forward_hook(lambda *_, i=i: mlp_calls.__setitem__(i, mlp_calls[i] + 1))
    blocks[0].register_forward_hook(lambda _m, args, out: seen.append({"in": args[0], "out0": out}))
    blocks[-1].register_forward_hook(lambda _m, _a, out: seen[-1].__setitem__("final", out))
    pipeline.generate(models, cfg, jobs, False)
    assert kinds(models) == "F" + "1" * (STEPS - 2) + "F"
    assert mlp_calls[0] == STEPS and all(n == 2 for n in mlp_calls[1:])  # the rest ran on the 2 computed steps
    computed = seen[0]
    for step in seen[1:-1]:
        rest = computed["final"] - computed["out0"]
        torch.testing.assert_close(step["final"], step["out0"] + rest, atol=1e-5, rtol=1e-5)
        assert not torch.equal(step["out0"], computed["out0"])  # block 0 really ran again
    assert models.controller.state.get(STACK, "rest_residual") is None  # the sample ended: nothing is held


@pytest.mark.slow
def test_the_flop_count_replays_the_decisions_and_counts_block_zero_on_skipped_steps():
    _, models, _ = load("fbcache", "threshold=0.2", flops=True)
    decided, counted, count = counted_tiny_loop(models)
    assert "first_block" in decided and decided.count("full") >= 3
    assert count(decided) == counted > 0
    # A skipped step costs block 0 more than skipping the whole stack: `d` per step, d > 0.
    one = ["full"] * STEPS
    d = count([*one[:-2], "first_block", "full"]) - count([*one[:-2], "aggressive", "full"])
    whole = [k if k == "full" else "aggressive" for k in decided]
    assert d > 0 and count(decided) - count(whole) == d * decided.count("first_block")


@pytest.mark.slow
def test_cli_generates_with_fbcache_and_records_its_settings(tmp_path):
    def cli(name: str, *flags: str) -> int:
        return main(
            [
                "--config",
                str(TINY),
                "--save-dir",
                str(tmp_path / name),
                "--quiet",
                "--prompt",
                *PROMPTS,
                "--batch-size",
                "2",
                "--num-sampling-steps",
                str(STEPS),
                *flags,
            ]
        )

    assert cli("none", "--cache", "none") == 0
    assert cli("fb", "--cache", "fbcache", "--cache-opt", "threshold=0.2", "--cache-opt", "warmup_steps=2") == 0
    for i in range(2):
        base = json.loads((tmp_path / "none" / f"sample_{i:04d}.json").read_text())
        record = json.loads((tmp_path / "fb" / f"sample_{i:04d}.json").read_text())
        assert record["method"] == "fbcache" and (tmp_path / "fb" / f"sample_{i:04d}.mp4").is_file()
        assert record["method_config"]["threshold"] == 0.2 and record["method_config"]["warmup_steps"] == 2
        assert 0 < record["dit_tflops"] < base["dit_tflops"]


def test_bad_settings_are_clear_errors(tmp_path, capsys):
    for opt, field in (("threshold=-1", "threshold"), ("warmup_steps=0", "warmup_steps"), ("max_skips=-2", "max")):
        argv = [
            "--config",
            str(TINY),
            "--save-dir",
            str(tmp_path),
            "--prompt",
            PROMPTS[0],
            "--cache",
            "fbcache",
            "--cache-opt",
            opt,
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "fbcache" in err and field in err and "allowed" in err, err


@pytest.mark.multiprocess
def test_two_sequence_parallel_ranks_decide_as_one_process(tmp_path):
    pytest.importorskip("colossalai")
    threshold = 0.13  # on this model and input the signals stay >= 5e-3 away from it (rounding is ~1e-8)
    reports = run_workers("decisions_worker.py", 2, tmp_path, "fbcache", str(threshold))
    single = reports[0]["kinds_single"]
    assert "full" in single[1:-1] and "first_block" in single  # the threshold splits the steps
    for report in reports:
        assert report["kinds_sp"] == report["kinds_single"] == single
        assert report["max_diff"] <= 1e-5
        pairs = [
            (a, b)
            for sp, one in zip(report["signals_sp"], report["signals_single"])
            if sp is not None
            for a, b in zip(sp, one)
        ]  # one signal per video and step
        assert pairs and all(abs(a - b) < 1e-6 and abs(a - threshold) > 1e-3 for a, b in pairs)
