import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duca_video.parallel.comm import CommStats, SimulatedGroup, heads_to_seq, seq_to_heads
from duca_video.parallel.launch import ParallelDims
from duca_video.parallel.sequence import SequenceParallel, check_sp_size, parallelize_stdit3
from tests.helpers import tiny_model
from tests.torchrun import ROOT, TORCHRUN, run_workers


@pytest.mark.multiprocess
@pytest.mark.parametrize("n", [2, 4])
def test_sequence_parallel_equals_one_process_and_cached_steps_need_no_collective(n, tmp_path):
    pytest.importorskip("colossalai")
    for report in run_workers("sp_worker.py", n, tmp_path):
        assert report["world"] == n
        for method, result in report["methods"].items():
            assert result["max_diff"] <= 1e-5, (n, method, result["max_diff"])
            for step, calls in result["calls_by_step"].items():
                kind, _, spatial = step.partition(":")
                # A step that reuses the spatial attention (every conservative and aggressive step of the
                # token-wise methods, PAB's broadcast steps) must not communicate at all.
                assert not (kind == "aggressive" or spatial.startswith(("R", "P"))), (n, method, step, calls)
        # VAE decoding split over the group gives the writer the same video as decoding it whole.
        assert report["vae_max_diff"] is None if report["rank"] % n else report["vae_max_diff"] <= 1e-5
        assert "conservative" in report["methods"]["duca"]["history"]
        assert "aggressive" in report["methods"]["duca"]["history"]


def test_all_to_all_layouts_round_trip_on_a_simulated_group():
    # With one simulated rank per position, seq_to_heads then heads_to_seq is the identity.
    x = torch.randn(3, 5, 2, 4, 6)
    g, stats = SimulatedGroup(size=1), CommStats()
    back = heads_to_seq(seq_to_heads(x, g, stats)[:, :, 0], g, stats)
    torch.testing.assert_close(back, x[:, :, 0])
    assert stats.total_bytes == 0  # one rank sends nothing


def test_shard_pads_and_masks_any_spatial_size():
    sp = SequenceParallel(SimulatedGroup(size=4, rank=3))
    local = sp.shard(torch.randn(2, 3, 15, 8))
    assert (sp.s_global, sp.s_padded, sp.s_local) == (15, 16, 4)
    assert local.shape == (2, 3 * 4, 8)
    assert sp.local_valid(3, torch.device("cpu")).tolist() == [True, True, True, False] * 3
    assert sp.key_mask(2, torch.device("cpu")).sum(1).tolist() == [15, 15]


def test_head_count_that_the_sp_size_does_not_divide_is_a_clear_error():
    with pytest.raises(ValueError, match="num_heads \\(16\\) divisible.*allowed SP sizes: \\[1, 2, 4, 8, 16\\]"):
        check_sp_size(16, 3)
    with pytest.raises(ValueError, match="divisible"):
        parallelize_stdit3(tiny_model(), SimulatedGroup(size=3))


def _inference(tmp_path: Path, save: str, nproc: int, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "scripts" / "inference.py")
    launcher = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    args = [
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        "--save-dir",
        str(tmp_path / save),
        "--quiet",
        "--num-sampling-steps",
        "6",
        "--save-latents",
        "--batch-size",
        "1",
        *flags,
    ]
    return subprocess.run([*launcher, script, *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.multiprocess
def test_cli_data_parallel_writes_each_prompt_once_and_sequence_parallel_matches_one_process(tmp_path):
    pytest.importorskip("colossalai")
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red circle moving left on a dark background\n"
        "a blue square moving up on a light background\n"
        "a green circle moving right on a dark background\n"
        "a small yellow square moving down on a dark background\n"
    )
    names = [f"sample_{i:04d}" for i in range(4)]
    # DuCa (tiny.py's method) with batches > 1: one process puts the 4 prompts in one batch, the 2 data-parallel
    # groups put prompts 2 and 3 on rows 0 and 1 of their batch. Each video's selection follows its own seed.
    single = _inference(tmp_path, "single", 1, "--prompt-path", str(prompts), "--batch-size", "4")
    assert single.returncode == 0, single.stderr[-2000:]
    dp = _inference(tmp_path, "dp", 2, "--prompt-path", str(prompts), "--sp-size", "1", "--batch-size", "2")
    assert dp.returncode == 0, dp.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "dp").glob("*.json"))]
    assert [r["name"] for r in records] == names
    assert {r["rank"] for r in records} == {0, 1} and {r["dp_size"] for r in records} == {2}
    # One summary for the whole job, printed once.
    assert dp.stdout.count("summary:") == 1 and "4 written" in dp.stdout, dp.stdout
    assert "job: 4 of 4 video(s) complete on disk" in dp.stdout
    sp = _inference(
        tmp_path, "sp", 2, "--prompt-path", str(prompts), "--sp-size", "2", "--end-index", "2", "--batch-size", "2"
    )
    assert sp.returncode == 0, sp.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "sp").glob("*.mp4")) == ["sample_0000.mp4", "sample_0001.mp4"]
    for name in names:
        ref = load_file(str(tmp_path / "single" / f"{name}.latent.safetensors"))["latent"]
        others = ("sp", "dp") if name in names[:2] else ("dp",)
        for other in others:  # the same seed gives the same video whatever the world size and the batch
            theirs = load_file(str(tmp_path / other / f"{name}.latent.safetensors"))["latent"]
            torch.testing.assert_close(theirs, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("world, sp, cfg", [(8, 2, 2), (4, 4, 1), (6, 3, 2), (2, 1, 2)])
def test_parallel_dims_lay_out_video_groups_on_consecutive_ranks(world, sp, cfg):
    # Our own mesh (no ColossalAI API, so 0.3.7 and 0.5.0 build the same groups): row-major (dp, cfg, sp).
    dims = ParallelDims(world, sp, cfg)
    assert dims.shape == (world // (sp * cfg), cfg, sp)
    assert [dims.coordinate(r) for r in range(world)] == [
        (d, c, s) for d in range(dims.dp) for c in range(cfg) for s in range(sp)
    ]
    video_groups = dims.groups_along((1, 2))
    assert video_groups == [list(range(i, i + sp * cfg)) for i in range(0, world, sp * cfg)]
    for axes in [(0,), (1,), (2,)]:
        groups = dims.groups_along(axes)
        assert sorted(r for g in groups for r in g) == list(range(world))  # a partition of the ranks
        assert all(len(g) == dims.shape[axes[0]] for g in groups)


def test_parallel_dims_refuse_a_layout_that_does_not_fit_the_world():
    with pytest.raises(ValueError, match=r"--sp-size 3 does not divide the world size 4; allowed: \[1, 2, 4\]"):
        ParallelDims(4, 3)
    with pytest.raises(ValueError, match="world size 3 must be even"):
        ParallelDims(3, 1, 2)
    with pytest.raises(ValueError, match=r"4 / 2 \(CFG halves\); allowed: \[1, 2\]"):
        ParallelDims(4, 4, 2)
