"""Filesystem faults end a job cleanly: a full disk while locking or writing (exit 1, a summary, no traceback,
nothing half-written, no lock left), a folder where a file goes (exit 2 before any work), prompts from a pipe or a
FIFO (read once, no hang), a complete job on a folder that cannot be written (reported complete, exit 0).

The disk-full cases make the write raise ENOSPC where the job writes (the lock's holder, the record): the
machine's disk cannot be filled by a test."""

from __future__ import annotations

import errno
import json
import os
import runpy
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from duca_video import pipeline
from duca_video.jobs import locks, outputs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "inference.py"
TINY = ROOT / "configs" / "tiny.py"
PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]
main = runpy.run_path(str(SCRIPT), run_name="inference_cli")["main"]


def _full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _run(tmp_path: Path, *flags: str) -> int:
    return main(
        [
            "--config",
            str(TINY),
            "--save-dir",
            str(tmp_path / "out"),
            "--num-sampling-steps",
            "2",
            "--quiet",
            "--prompt",
            *PROMPTS,
            "--batch-size",
            "1",
            *flags,
        ]
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_full_disk_while_locking_ends_the_job_with_a_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(locks, "json", types.SimpleNamespace(dumps=_full, dump=_full, loads=json.loads))
    code = _run(tmp_path)
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err + out, err
    assert "summary: 0 written, 0 skipped (already complete), 2 failed" in out
    assert "FAILED sample_0000: not written: the disk is full (No space left on device)" in out
    assert _leftovers(tmp_path / "out") == []  # no lock, no temporary file


def test_a_full_disk_while_writing_a_record_leaves_no_video_without_its_record(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(outputs, "atomic_write_json", _full)
    code = _run(tmp_path)
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err + out, err
    assert "summary: 0 written" in out and "2 failed" in out
    assert _leftovers(tmp_path / "out") == []  # the first video's mp4 removed with its record; the second not tried


def test_a_folder_where_a_video_goes_is_named_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "out" / "sample_0001.mp4").mkdir(parents=True)
    monkeypatch.setattr(pipeline, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    code = _run(tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "sample_0001.mp4 is a folder, where sample_0001's output" in err


def test_a_complete_job_on_a_folder_it_cannot_write_is_reported_complete(tmp_path, capsys, monkeypatch):
    assert _run(tmp_path) == 0
    capsys.readouterr()

    def read_only(folder):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))

    monkeypatch.setattr(pipeline, "check_writable", read_only)
    assert _run(tmp_path) == 0
    assert "summary: 0 written, 2 skipped (already complete), 0 failed" in capsys.readouterr().out
    (tmp_path / "out" / "sample_0001.json").unlink()  # now there is work: the folder must be writable
    assert _run(tmp_path) == 2
    assert "is not writable: [Errno 30] Read-only file system" in capsys.readouterr().err


def _cli(tmp_path: Path, prompt_path: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--config",
        str(TINY),
        "--save-dir",
        str(tmp_path / "out"),
        "--num-sampling-steps",
        "2",
        "--quiet",
        "--prompt-path",
        prompt_path,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, input=stdin, env=env, capture_output=True, text=True, timeout=180)


def test_prompts_from_standard_input(tmp_path):
    done = _cli(tmp_path, "/dev/stdin", stdin="\n".join(PROMPTS) + "\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 written" in done.stdout


def test_prompts_from_a_fifo_are_read_once_without_waiting_for_a_second_writer(tmp_path):
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "w") as f:
            f.write("\n".join(PROMPTS) + "\n")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    done = _cli(tmp_path, str(fifo))
    writer.join(timeout=5)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 written" in done.stdout
