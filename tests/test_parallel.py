import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from duca_video.parallel.comm import CommStats, SimulatedGroup, heads_to_seq, seq_to_heads
from duca_video.parallel.sequence import SequenceParallel, check_sp_size, enable_sequence_parallel
from tests.test_stdit3 import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun")


def run_workers(n: int, tmp_path: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        TORCHRUN,
        "--standalone",
        f"--nproc_per_node={n}",
        str(ROOT / "tests" / "dist" / "sp_worker.py"),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
@pytest.mark.parametrize("n", [2, 4])
def test_sequence_parallel_equals_one_process_and_cached_steps_need_no_collective(n, tmp_path):
    pytest.importorskip("colossalai")
    for report in run_workers(n, tmp_path):
        assert report["world"] == n
        for method, result in report["methods"].items():
            assert result["max_diff"] <= 1e-5, (n, method, result["max_diff"])
            for step, calls in result["calls_by_step"].items():
                kind, _, spatial = step.partition(":")
                # A step that reuses the spatial attention (every conservative and aggressive step of the
                # token-wise methods, PAB's broadcast steps) must not communicate at all.
                assert not (kind == "aggressive" or spatial.startswith(("R", "P"))), (n, method, step, calls)
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
        enable_sequence_parallel(tiny_model(), SimulatedGroup(size=3))
