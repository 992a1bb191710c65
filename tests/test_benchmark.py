import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from duca_video.metrics.benchmark import BenchSetup, compare, format_table
from duca_video.metrics.fidelity import psnr, ssim
from duca_video.models import STDiT3Config

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "tflops",
    "flops_speedup",
    "latency_s",
    "latency_speedup",
    "peak_memory_bytes",
    "cache_bytes",
    "psnr_vs_none",
    "ssim_vs_none",
}


def tiny_setup(steps=6):
    cfg = STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8)
    fewer = {"steps": {"num_steps": 3}}
    return BenchSetup(
        model=cfg,
        latent_shape=(3, 8, 10),
        image_size=(64, 80),
        num_frames=9,
        num_steps=steps,
        cfg_scale=4.0,
        use_timestep_transform=False,
        cache_overrides=fewer,
    )


def test_compare_reports_every_field_and_sensible_values():
    results = compare(tiny_setup(), ["duca", "fora", "teacache", "steps"], repeats=1)
    assert set(results) == {"none", "duca", "fora", "teacache", "steps"}
    for r in results.values():
        assert set(r) == KEYS
    none, duca = results["none"], results["duca"]
    assert none["flops_speedup"] == 1.0 and math.isinf(none["psnr_vs_none"]) and none["ssim_vs_none"] == 1.0
    assert duca["flops_speedup"] > 1.5 and duca["cache_bytes"] > 0 and duca["latency_s"] > 0
    assert abs(results["steps"]["flops_speedup"] - 2.0) < 0.01  # 3 of 6 steps
    assert results["teacache"]["tflops"] is not None  # counted in the real run
    assert "duca" in format_table(results)


@pytest.mark.slow
def test_flops_only_cli_writes_contract_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "benchmark.py"),
        "--config",
        str(ROOT / "configs" / "bench_cpu.py"),
        "--methods",
        "none,duca",
        "--json",
        str(out),
        "--flops-only",
        "--num-sampling-steps",
        "6",
    ]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    data = json.loads(out.read_text())
    assert set(data) == {"config", "methods"} and set(data["methods"]) == {"none", "duca"}
    assert set(data["methods"]["duca"]) == KEYS
    assert data["methods"]["duca"]["latency_s"] is None and data["methods"]["duca"]["flops_speedup"] > 1


def test_psnr_and_ssim_known_values():
    import torch

    a = torch.rand(2, 16, 16)
    assert math.isinf(psnr(a, a, 1.0)) and abs(ssim(a, a, 1.0) - 1.0) < 1e-12
    noisy = a + 0.1  # constant offset: MSE = 0.01 -> PSNR = 20 dB at range 1
    assert abs(psnr(a, noisy, 1.0) - 20.0) < 1e-4
    assert ssim(a, torch.rand(2, 16, 16), 1.0) < 0.5


@pytest.mark.slow
def test_comm_bytes_counted_on_a_simulated_group_and_cached_methods_send_less():
    results = compare(tiny_setup(steps=10), ["duca", "fora"], flops_only=True, sp_sizes=(2, 4))
    none, duca, fora = (results[m]["comm_bytes"] for m in ("none", "duca", "fora"))
    for p in ("2", "4"):
        assert 0 < fora[p] < duca[p] < none[p]
    assert none["4"] > none["2"]  # more ranks, more of each tensor crosses the network


TINY_WEIGHTS = ROOT / "weights" / "tiny"


@pytest.mark.slow
def test_testbed_benchmark_reports_adherence_per_method(tmp_path):
    if not (TINY_WEIGHTS / "config.json").is_file():
        import pytest

        pytest.skip("the trained testbed weights (weights/tiny) are not in this checkout")
    out, plot = tmp_path / "tiny.json", tmp_path / "tiny.png"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "benchmark.py"),
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        "--ckpt-path",
        str(TINY_WEIGHTS),
        "--methods",
        "none,duca",
        "--prompts",
        "4",
        "--num-sampling-steps",
        "6",
        "--json",
        str(out),
        "--plot",
        str(plot),
        "--threads",
        "1",
        "--mask-strategy",
        "0",
    ]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    data = json.loads(out.read_text())["methods"]
    for record in data.values():
        assert KEYS <= set(record) and 0 <= record["color_accuracy"] <= 1 and 0 <= record["direction_accuracy"] <= 1
    assert data["duca"]["flops_speedup"] > 1.2 and plot.stat().st_size > 0
    # With --mask-strategy 0 (image to video): the reference frame is kept exactly by every method, and the
    # cached video is close to the uncached one without being it.
    assert data["none"]["cond_psnr_vs_none"] == float("inf") and data["duca"]["cond_kept_psnr"] == float("inf")
    assert 15 < data["duca"]["cond_psnr_vs_none"] < float("inf")
