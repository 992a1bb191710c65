"""Bad input under torchrun reads as on one process: one `error:` line (from rank 0), not one per rank spliced
together. The launcher's own exit status is 1 when a worker fails (each worker exits 2)."""

from __future__ import annotations

import subprocess

import pytest

from tests.torchrun import ROOT, TORCHRUN, worker_env


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--cache", "nosuch"], "error: argument --cache: invalid choice: 'nosuch'"),  # argparse's own check
        (["--seed", "-1"], "error: seed=-1 is not allowed"),  # the config's check
    ],
)
def test_bad_input_under_torchrun_gives_one_error_line(tmp_path, flags, message):
    cmd = [
        *TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "scripts" / "inference.py"),
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        "--prompt",
        "a red circle",
        "--save-dir",
        str(tmp_path),
        *flags,
    ]
    done = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), done.stderr[-3000:]
    assert done.returncode == 1  # torchrun's: some worker failed
    assert "exitcode: 2" in done.stderr  # the workers' own status, in the launcher's report
