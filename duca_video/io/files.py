"""Crash-safe output files: everything is written under a temporary name in the same folder, then renamed.

A run killed at any moment therefore leaves either the complete file or no file under the final name. The
temporary names carry the writer's process id (`.NAME.<pid>.tmp`), so a later run can remove those left by
processes that no longer exist without touching the ones a live job is still writing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_path",
    "atomic_write_json",
    "check_writable",
    "remove_stale_temps",
    "save_latent",
    "temp_name",
]

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `final`, on any exit by exception it is removed."""
    final = Path(final)
    tmp = temp_name(final)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync(path: Path) -> None:
    # The rename must never land before the data, or a power cut could leave a complete-looking empty file.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(final: str | os.PathLike, data: Any) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_latent(final: str | os.PathLike, latent: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
    """`latent` (C, T, H, W) under the key "latent" in a safetensors file."""
    from safetensors.torch import save_file

    with atomic_path(final) as tmp:
        save_file({"latent": latent.detach().to("cpu").contiguous()}, str(tmp), metadata=metadata)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, alive: Callable[[int], bool] = process_alive) -> list[Path]:
    """Delete temporary files whose writer process is gone; returns what was removed."""
    removed = []
    for path in Path(folder).iterdir():
        m = _TEMP.match(path.name)
        if m and path.is_file() and not alive(int(m["pid"])):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def is_storage_full(exc: BaseException) -> bool:
    """A write that failed because the disk (or the user's quota) is full: every later write fails too."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def check_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and prove a file can be written and renamed there; raise OSError if not."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save directory {str(folder)!r} exists and is not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    # One probe per process: data-parallel ranks check the same folder at the same moment.
    probe = folder / f".write-probe-{os.getpid()}"
    with atomic_path(probe) as tmp:
        tmp.write_bytes(b"")
    probe.unlink()
    return folder


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex} of a whole file (videos and latents: small next to a model)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}
