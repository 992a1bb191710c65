"""scripts/gpu_check.py: the --tiny self-test runs the whole check on the CPU; without CUDA the real one refuses;
the scaling model reads its JSON."""

import json
import runpy
from pathlib import Path

import pytest
import torch

from duca_video.metrics.scaling import rate_from_kernel_times
from duca_video.metrics.steps import forward_cost
from duca_video.models import STDiT3Config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
main = runpy.run_path(str(SCRIPT), run_name="gpu_check")["main"]


@pytest.fixture(scope="module")
def tiny_summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "tiny.json"
    argv = [
        "--tiny",
        "--steps",
        "5",
        "--methods",
        "none,duca,fora",
        "--offload",
        "duca",
        "--compile",
        "duca",
        "--compile-backend",
        "eager",
    ]  # inductor's numerics: tests/test_compile.py
    assert main([*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_tiny_run_times_every_step_by_kind_and_reports_each_part(tiny_summary):
    data, _ = tiny_summary
    assert set(data["methods"]) == {"none", "duca", "fora"}
    for name, r in data["methods"].items():
        assert sum(r["step_counts"].values()) == 5 == len(r["steps_ms"]) == len(r["kinds"])
        assert all(ms > 0 for ms in r["steps_ms"]) and set(r["step_ms"]) == set(r["kinds"])
        assert (r["cache_bytes"] > 0) == (name != "none")
    assert data["methods"]["none"]["kinds"] == ["full"] * 5
    assert "conservative" in data["methods"]["fora"]["kinds"]  # the cache really ran its schedule
    # every attention call of one forward ran a fused kernel, and all three sites were seen
    sites = {key.split(":")[0] for key in data["sdpa_ops"]}
    assert sites == {"spatial self", "temporal self", "cross"}
    assert not any("math" in key for key in data["sdpa_ops"])
    assert sum(data["sdpa_ops"].values()) == 2 * 2 * 2  # depth 2: 2 spatial + 2 temporal blocks, self + cross each
    if torch.cuda.is_available():
        assert data["sync_check"]["method"] == "duca"
    else:
        assert "CUDA absent" in data["sync_check"]["skipped"]
    # the cache offloaded: the same latent, less of the cache on the device, every later block prefetched
    off = data["offloaded"]["duca"]
    assert off["max_abs_diff_to_resident"] == 0 and off["kinds"] == data["methods"]["duca"]["kinds"]
    assert 0 < off["device_cache_bytes"] < off["cache_bytes"] == data["methods"]["duca"]["cache_bytes"]
    assert off["offload_reads"]["prefetched"] > 0
    # compiled blocks (dynamo's capture, eager backend): the same schedule and the eager latent
    comp = data["compiled"]["duca"]
    assert comp["kinds"] == data["methods"]["duca"]["kinds"] and comp["max_abs_diff_to_eager"] == 0
    assert "eager" in data["compiled"]["compiled"]
    precision = data["bf16_vs_fp32"]
    assert 0 < precision["rel_l2"] < 0.05  # bf16 differs from fp32, but only by rounding


def test_scaling_model_reads_the_measured_rate(tiny_summary):
    data, path = tiny_summary
    setup = data["setup"]
    flops, _ = forward_cost(
        STDiT3Config.from_dict(setup["model"]), tuple(setup["latent_shape"]), tuple(setup["image_size"]), rows=2
    )
    rate = rate_from_kernel_times(str(path))
    assert rate == pytest.approx(flops / (data["methods"]["none"]["step_ms"]["full"] / 1e3) / 1e12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the full check would run")
def test_without_cuda_and_without_tiny_exits_2_with_a_clear_message(capsys, tmp_path):
    assert main(["--out", str(tmp_path / "x.json")]) == 2
    assert "needs CUDA" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
