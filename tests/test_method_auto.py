"""`auto`: the schedule solved for a FLOP budget from a calibration of the model (cache/methods/auto.py, the
solver in auto_solver.py, the calibration in cache/calibrate.py), on the shipped testbed model through the real
pipeline. Sequence parallelism, CFG parallelism, offload and batch invariance: tests/dist/sp_worker.py,
cfg_worker.py, test_cache_offload.py and test_pipeline.py list `auto` with the other methods."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from duca_video import cache
from duca_video.cache.calibrate import main as calibrate_main
from duca_video.cache.calibration_check import spearman
from duca_video.cache.methods.auto_solver import BUILTIN, Calibration, magcache_calibration, solve
from tests.helpers import (
    TINY_CONFIG,
    TINY_STEPS,
    TWO_PROMPTS,
    counted_tiny_loop,
    generate_tiny_batch,
    inference_main,
    load_tiny_batch,
)

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "auto.json"  # the testbed's calibration


def synthetic(n: int, seed: int, patterns=("A", "R", "C"), span: int = 4) -> Calibration:
    rng = random.Random(seed)
    errors = {p: [[0.0] + [rng.uniform(0.01, 1.0) * m for m in range(1, span)] for _ in range(n)] for p in patterns}
    costs = {"F": 1.0, "C": 0.3, "M": 0.05, "A": 0.01, "R": 0.01, "S": 0.5, "T": 0.5}
    gain = [rng.uniform(0.2, 1.5) for _ in range(n + 1)]
    return Calibration(n, costs, errors, gain, 0.15, "synthetic", "synthetic")


@pytest.mark.parametrize("seed, speedup", [(0, 2.0), (1, 2.5), (2, 3.0)])
def test_the_solver_finds_the_least_predicted_error_within_the_budget(seed, speedup):
    n = 7
    cal = synthetic(n, seed)
    solved = solve(cal, speedup, n)
    budget = n / speedup
    best = None
    for tail in itertools.product("FARC", repeat=n - 1):
        letters = "F" + "".join(tail)
        predicted = cal.predict(letters)
        if predicted is not None and cal.cost(letters) <= budget + 1e-9 and (best is None or predicted < best):
            best = predicted
    assert solved.cost <= budget + 1e-9
    assert solved.predicted == pytest.approx(best, rel=1e-9)
    assert cal.predict(solved.letters) == pytest.approx(solved.predicted, rel=1e-9)


def test_a_speedup_out_of_reach_names_the_most_the_calibration_allows():
    with pytest.raises(ValueError, match=r"speedup=9 is out of reach .* the most it allows over 7 steps is"):
        solve(synthetic(7, 0), 9.0, 7)


def test_the_builtin_open_sora_calibration_keeps_the_first_fifth_and_uses_full_and_residual_steps_only():
    for speedup in (2.0, 2.5, 3.0, 4.0):
        letters = cache.make_config("auto", speedup=speedup).letters(30)
        assert set(letters) <= {"F", "R"} and letters.startswith("F" * 6), letters
        assert 30 / magcache_calibration().cost(letters) >= speedup - 1e-9


@pytest.mark.parametrize(
    "opts, words",
    [
        ({"schedule": "FXF"}, ["schedule", "letters from FCMARST"]),
        ({"schedule": "RFF"}, ["schedule", "starting with F"]),
        ({"speedup": 0.5}, ["speedup", "[1, 100]"]),
        ({"calibration": "/nonexistent/cal.json"}, ["no such file", "duca_video.cache.calibrate", BUILTIN]),
    ],
)
def test_bad_settings_say_what_is_allowed(opts, words):
    with pytest.raises(ValueError) as err:
        cache.make_config("auto", **opts)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_a_broken_calibration_file_is_refused_naming_the_field(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"format": "duca-video auto calibration", "num_steps": 10, "costs": {"F": 1.0}}))
    with pytest.raises(ValueError, match="costs must give every letter"):
        cache.make_config("auto", calibration=str(path))


@pytest.fixture(scope="module")
def reference():
    return generate_tiny_batch("none")[0].latents


def test_a_schedule_of_full_steps_equals_none_bitwise(reference):
    out, models = generate_tiny_batch("auto", "schedule=" + "F" * TINY_STEPS)
    assert torch.equal(out.latents, reference)


def test_a_written_schedule_runs_letter_by_letter():
    letters = "FFRRAFCMAS"
    cfg, models, jobs = load_tiny_batch("auto", f"schedule={letters}")
    blocks, seen = models.controller.blocks, []
    blocks[0].register_forward_pre_hook(lambda _m, args: seen.append({"in": args[0]}))
    blocks[-1].register_forward_hook(lambda _m, _a, out: seen[-1].__setitem__("out", out))
    from duca_video import pipeline

    pipeline.generate(models, cfg, jobs, False)
    history = models.controller.history
    expected = {"F": "full", "C": "conservative", "M": "conservative", "A": "aggressive", "R": "aggressive"}
    expected["S"] = "conservative"
    assert [h["kind"].split(":")[0] for h in history] == [expected[c] for c in letters]
    assert [h["spatial"] for h in history][6:8] == ["RRP", "RRR"]  # C: the MLP partly recomputed; M: all reused
    assert (history[9]["spatial"], history[9]["temporal"]) == ("CCC", "RRR")  # S: spatial blocks only
    close = dict(atol=1e-5, rtol=1e-5)
    residual = seen[1]["out"] - seen[1]["in"]  # step 1, the last computed before the R steps
    for k in (2, 3):  # R: this step's input + that residual
        torch.testing.assert_close(seen[k]["out"], seen[k]["in"] + residual, **close)
    torch.testing.assert_close(seen[4]["out"], seen[1]["out"], **close)  # A: the last computed output, whole
    torch.testing.assert_close(seen[8]["out"], seen[7]["out"], **close)  # ... here the M step's


def test_the_flop_count_replays_the_schedule():
    _, models, _ = load_tiny_batch("auto", "schedule=FFRCAFMRST", flops=True)
    decided, counted, count = counted_tiny_loop(models)
    assert count(decided) == counted > 0


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """A calibration of the testbed model at the tests' step count (2 prompts, spans up to 4 steps)."""
    out = tmp_path_factory.mktemp("cal") / "auto.json"
    argv = ["--config", str(TINY_CONFIG), "--num-sampling-steps", str(TINY_STEPS), "--batch-size", "1"]
    assert calibrate_main(["--prompts", "2", "--held-out", "2", "--max-span", "4", "--out", str(out), *argv]) == 0
    return out


def test_the_calibration_file_holds_the_error_model_and_its_check(calibration):
    data = json.loads(calibration.read_text())
    assert data["num_steps"] == TINY_STEPS and data["prompts"] == 2
    assert set(data["errors"]) == {"A", "R", "C", "M", "S", "T", "CA", "CR"}
    assert data["costs"]["F"] == 1.0 and 0 < data["costs"]["A"] < data["costs"]["C"] < 1
    row = data["errors"]["R"][2]
    assert row[0] == 0.0 and 0 < row[1] < row[2] < row[3]  # longer reuse, further from the uncached latent
    check = data["check"]
    assert check["prompts"] == 2 and not set(check["prompt_texts"]) & set(data["prompt_texts"])  # held out
    from duca_video.testbed.evaluate import balanced_prompts

    assert not set(balanced_prompts(64, 0)) & {*data["prompt_texts"], *check["prompt_texts"]}  # the benchmark's
    assert -1 <= check["spearman"] <= 1 and len(check["rows"]) >= 10
    assert not calibration.with_name("auto.json.partial").exists()


def test_the_calibrations_uncached_run_is_the_samplers(calibration):
    """The segments start from the latents the pipeline's own sampler produced: replaying the recorded inputs with
    only full steps reproduces its final latent."""
    from duca_video import pipeline
    from duca_video.cache.calibrate import Trajectory, run_schedule

    cfg, models, jobs = load_tiny_batch("none")
    traj = Trajectory(models.model, cfg.scheduler.cfg_scale, len(jobs))
    generated = []
    traj.record(lambda: generated.append(pipeline.generate(models, cfg, jobs, False)))
    with torch.no_grad():
        final = run_schedule(traj, "F" * TINY_STEPS, 0, (0, 1))[-1]
    torch.testing.assert_close(final, generated[0].latents.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(traj.latent(TINY_STEPS), final, atol=1e-5, rtol=0)


def test_a_stopped_calibration_continues_from_its_finished_batches(tmp_path, monkeypatch):
    from duca_video.cache import calibrate as module

    out, real, calls = tmp_path / "cal.json", module.calibrate_batch, []
    argv = ["--prompts", "2", "--max-span", "3", "--out", str(out), "--config", str(TINY_CONFIG)]
    argv += ["--num-sampling-steps", "6", "--batch-size", "1"]

    def stop_after_one(*args, **kwargs):
        if calls:
            raise OSError("stopped")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "calibrate_batch", stop_after_one)
    assert calibrate_main(argv) == 2
    assert not out.exists() and len(json.loads(out.with_name("cal.json.partial").read_text())["parts"]) == 1
    counted = []
    monkeypatch.setattr(module, "calibrate_batch", lambda *a, **k: counted.append(1) or real(*a, **k))
    assert calibrate_main(argv) == 0
    assert counted == [1] and json.loads(out.read_text())["prompts"] == 2


def test_solved_schedule_meets_its_flop_budget_and_the_summary_shows_where_it_went(calibration):
    _, models, _ = load_tiny_batch("auto", f"calibration={calibration}", "speedup=2", flops=True)
    decided, counted, _ = counted_tiny_loop(models)
    _, full_models, _ = load_tiny_batch("auto", "schedule=" + "F" * TINY_STEPS, flops=True)
    _, full, _ = counted_tiny_loop(full_models)
    assert full / counted >= 2.0 * 0.99  # the budget, up to the loop's parts outside the steps
    text = models.controller.summary()
    assert "auto: solved for 2x FLOPs from" in text and "predicted error" in text and "% of the FLOPs" in text


def test_a_changed_calibration_file_is_refused_on_resume(tmp_path, calibration, capsys):
    cal = tmp_path / "cal.json"
    cal.write_bytes(calibration.read_bytes())
    argv = ["--config", str(TINY_CONFIG), "--save-dir", str(tmp_path / "out"), "--quiet", "--prompt", TWO_PROMPTS[0]]
    argv += ["--num-sampling-steps", str(TINY_STEPS), "--cache", "auto", "--cache-opt", f"calibration={cal}"]
    argv += ["--cache-opt", "speedup=2"]
    assert inference_main(argv) == 0
    record = json.loads((tmp_path / "out" / "sample_0000.json").read_text())
    data = json.loads(cal.read_text())
    assert record["method_config"]["calibration"] == str(cal)
    assert inference_main(argv) == 0  # the same file: the video is complete
    data["gain"][3] *= 1.5
    cal.write_text(json.dumps(data))
    capsys.readouterr()
    assert inference_main(argv) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "method_inputs.calibration" in err, err


def test_spearman_is_one_for_the_same_order_and_minus_one_reversed():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isclose(spearman([1, 1, 2], [1, 1, 2]), 1.0)


def test_the_builtin_skip_cost_is_the_counted_one(tmp_path):
    """The built-in Open-Sora 1.2 calibration's cost of an R step: the FLOP count of two steps at 480p on meta."""
    import runpy

    from tests.helpers import ROOT

    out = tmp_path / "fr.json"
    bench = runpy.run_path(str(ROOT / "scripts" / "benchmark.py"), run_name="bench")["main"]
    argv = ["--config", str(ROOT / "configs" / "duca_480p.py"), "--num-sampling-steps", "2", "--flops-only"]
    bench([*argv, "--methods", "auto[schedule=FF],auto[schedule=FR]", "--json", str(out)])
    tflops = {k: v["tflops"] for k, v in json.loads(out.read_text())["methods"].items()}
    full = tflops["auto[schedule=FF]"] / 2
    counted = (tflops["auto[schedule=FR]"] - full) / full
    assert magcache_calibration().costs["R"] == pytest.approx(counted, rel=0.01)


def test_a_time_budget_uses_the_measured_step_times(calibration):
    data = json.loads(calibration.read_text())
    assert data["times"]["F"] == 1.0 and all(0 < data["times"][c] < 1 for c in "CMARST"), data["times"]
    config = cache.make_config("auto", calibration=str(calibration), speedup=2.0, budget="time")
    letters = config.letters(TINY_STEPS)
    cal = config.loaded_calibration()
    assert cal.cost(letters, "time") <= TINY_STEPS / 2.0 + 1e-9
    with pytest.raises(ValueError, match="budget='time' needs measured times"):
        cache.make_config("auto", speedup=2.0, budget="time").letters(30)


@pytest.mark.slow
def test_four_videos_in_one_batch_equal_each_alone_with_every_letter(tmp_path):
    """Batch invariance with token recomputation (C), block-kind (S / T) and skip (A / R) steps."""
    from safetensors.torch import load_file

    from duca_video import pipeline
    from duca_video.configs import build_parser, load_config

    prompts = [*TWO_PROMPTS, "a small green circle moving right on a light background"]
    prompts.append("a small yellow square moving down on a dark background")
    flags = ["--config", str(TINY_CONFIG), "--quiet", "--save-latents", "--num-sampling-steps", "8"]
    flags += ["--prompt", *prompts, "--cache", "auto", "--cache-opt", "schedule=FFCRSATC"]
    for name, batch in (("a", "4"), ("b", "1")):
        argv = [*flags, "--save-dir", str(tmp_path / name), "--batch-size", batch]
        pipeline.run(load_config(argv[1], build_parser().parse_args(argv)))
    for i in range(4):
        a = load_file(tmp_path / "a" / f"sample_{i:04d}.latent.safetensors")["latent"]
        b = load_file(tmp_path / "b" / f"sample_{i:04d}.latent.safetensors")["latent"]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_front_margin_compares_with_fixed_variants_at_equal_or_lower_flops():
    from duca_video.metrics.pareto import format_margins, front_margins

    def r(speedup, psnr, ssim=0.9):
        return {"flops_speedup": speedup, "psnr_vs_none": psnr, "ssim_vs_none": ssim, "latency_speedup": speedup}

    results = {"none": r(1.0, math.inf, 1.0), "a": r(2.4, 45.0), "b": r(2.6, 38.0), "c": r(3.5, 30.0)}
    results.update({"auto[speedup=2.5]": r(2.5, 40.0), "auto[speedup=4]": r(4.0, 33.0)})
    rows = {row["variant"]: row for row in front_margins(results, "auto")}
    assert rows["auto[speedup=2.5]"]["front_variant"] == "b"  # a is faster in PSNR but slower in FLOPs
    assert rows["auto[speedup=4]"]["front_psnr"] is None
    table = format_margins(list(rows.values()))
    assert "+2.00 dB" in table and "none that fast" in table


@pytest.mark.parametrize(
    "opts, words",
    [
        ([f"calibration={SHIPPED}", "speedup=2.5"], ["is for 30 steps, the run has 10"]),
        (["schedule=FFF"], ["schedule has 3 letters for a run of 10 steps"]),
    ],
)
def test_a_run_the_calibration_or_schedule_cannot_serve_stops_before_any_model_loads(tmp_path, capsys, opts, words):
    argv = ["--config", str(TINY_CONFIG), "--save-dir", str(tmp_path), "--prompt", TWO_PROMPTS[0]]
    argv += ["--num-sampling-steps", str(TINY_STEPS), "--cache", "auto"]
    argv += [f"--cache-opt={o}" for o in opts]
    assert inference_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and all(w in err for w in words) and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


def test_a_speedup_out_of_reach_stops_before_any_model_loads(tmp_path, capsys):
    argv = ["--config", str(TINY_CONFIG), "--save-dir", str(tmp_path), "--prompt", TWO_PROMPTS[0], "--cache", "auto"]
    argv += [f"--cache-opt=calibration={SHIPPED}", "--cache-opt=speedup=40"]
    assert inference_main(argv) == 2
    assert "speedup=40 is out of reach" in capsys.readouterr().err
