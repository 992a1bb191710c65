"""CFG parallelism: the conditional and unconditional halves on two ranks, one exchange per step, the same video."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.torchrun import ROOT, TORCHRUN, run_workers, worker_env

ENV = worker_env()


@pytest.mark.multiprocess
@pytest.mark.parametrize("n, sp", [(2, 1), (4, 2)])
def test_cfg_halves_on_two_ranks_give_the_one_process_video_with_one_exchange_per_step(n, sp, tmp_path):
    pytest.importorskip("colossalai")
    reports = run_workers("cfg_worker.py", n, tmp_path, str(sp))
    assert sorted(r["cfg_rank"] for r in reports) == sorted([0, 1] * (n // 2))
    for report in reports:
        for method, result in report["methods"].items():
            assert result["max_diff"] <= 1e-5, (n, method, result["max_diff"])
            # Same decisions as one process (TeaCache's signal is summed over both halves).
            assert result["kinds"] == result["single_kinds"], (method, result["kinds"])
            for key, count in result["calls_by_step"].items():
                kind, name = key.split("|")
                if kind == "outside":
                    continue
                step_kind, _, spatial = kind.partition(":")
                reuses = step_kind == "aggressive" or spatial.startswith(("R", "P"))
                if name == "all_gather" and not reuses:
                    continue
                if reuses and method != "teacache":  # a cached step sends the prediction exchange and nothing else
                    assert name == "all_gather", (method, key, count)
        duca = report["methods"]["duca"]["kinds"]
        assert "aggressive" in duca and "conservative" in duca


@pytest.mark.multiprocess
def test_cli_cfg_parallel_writes_the_one_process_latents(tmp_path):
    pytest.importorskip("colossalai")
    flags = [
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        "--prompt",
        "a large red circle moving left on a dark background",
        "a small blue square moving up on a light background",
        "--batch-size",
        "2",
        "--num-sampling-steps",
        "8",
        "--save-latents",
        "--quiet",
        "--cache",
        "duca",
    ]
    script = str(ROOT / "scripts" / "inference.py")
    one = subprocess.run(
        [sys.executable, script, *flags, "--save-dir", str(tmp_path / "one")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            *TORCHRUN,
            "--standalone",
            "--nproc_per_node=2",
            script,
            *flags,
            "--cfg-parallel",
            "--save-dir",
            str(tmp_path / "two"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("sample_0000", "sample_0001"):
        a = load_file(str(tmp_path / "one" / f"{name}.latent.safetensors"))["latent"]
        b = load_file(str(tmp_path / "two" / f"{name}.latent.safetensors"))["latent"]
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        record = json.loads((tmp_path / "two" / f"{name}.json").read_text())
        assert (record["world_size"], record["cfg_size"], record["sp_size"], record["dp_size"]) == (2, 2, 1, 1)
    assert sorted(p.name for p in (tmp_path / "two").glob("*.mp4")) == ["sample_0000.mp4", "sample_0001.mp4"]


def test_cfg_parallel_without_guidance_or_processes_is_a_clear_error(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    from inference import main

    base = [
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        "--prompt",
        "a red circle",
        "--save-dir",
        str(tmp_path / "out"),
        "--cfg-parallel",
    ]
    assert main([*base, "--cfg-scale", "1"]) == 2
    assert "cfg_parallel needs classifier-free guidance" in capsys.readouterr().err
    assert main(base) == 2
    assert "--cfg-parallel needs 2 processes" in capsys.readouterr().err
