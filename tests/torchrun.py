"""Multi-process tests: start workers with this interpreter's own torch.distributed.run (a `torchrun` missing
from PATH must not turn into a silent skip) and read the JSON report each rank writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def worker_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def run_workers(
    script: str,
    n: int,
    out_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    skip_if: dict[str, str] | None = None,
) -> list[dict]:
    """Run tests/dist/`script` on `n` gloo ranks with (out_dir, *args); the reports rank0.json, rank1.json, ...
    `skip_if` maps a message of a failed run to the reason the test skips (something this machine lacks)."""
    cmd = [
        *TORCHRUN,
        "--standalone",
        f"--nproc_per_node={n}",
        str(ROOT / "tests" / "dist" / script),
        str(out_dir),
        *args,
    ]
    done = subprocess.run(cmd, env=env or worker_env(), capture_output=True, text=True, timeout=600)
    for message, reason in (skip_if or {}).items():
        if done.returncode != 0 and message in done.stderr:
            import pytest

            print(f"SKIP: {reason}")
            pytest.skip(reason)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(n)]
