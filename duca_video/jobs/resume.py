"""What makes a finished video trustworthy on resume: its record names every setting that changes its pixels
(the video's *identity*), and the sizes and hashes of the files it describes.

A video counts as complete only when its record's identity equals the one the current job would write and its
files are whole (same byte count and SHA-256 as recorded). A record with another identity describes another
video: the job refuses it (or regenerates it with `overwrite`), it never keeps it silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.files import file_digest
from .records import OutputPaths

__all__ = ["OutputStatus", "check_output", "file_digest", "identity_diff", "weights_fingerprint"]

_EDGE = 1 << 20  # weights are fingerprinted by their size and their first and last MiB


def weights_fingerprint(path: str | os.PathLike | None) -> str | None:
    """A short fingerprint of a weights file or folder (every non-hidden file in it), independent of where the
    weights live; None for no weights (random init)."""
    if path is None:
        return None
    root = Path(path).expanduser()
    if root.is_file():
        files = [root]
    else:
        hidden = lambda p: any(part.startswith(".") for part in p.relative_to(root).parts)  # noqa: E731
        files = sorted(p for p in root.rglob("*") if p.is_file() and not hidden(p))
    h = hashlib.sha256()
    for p in files:
        name = p.name if p == root else str(p.relative_to(root))
        h.update(f"{name}\0{_edge_digest(p)}\n".encode())
    return h.hexdigest()[:20]


def _edge_digest(path: Path) -> str:
    # A full hash of a 10 GB checkpoint would cost more than some videos; size + both ends tells apart any two
    # checkpoints in practice, and does not change when the same file is copied or moved.
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if size > 2 * _EDGE:
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
        elif size > _EDGE:
            h.update(f.read())
    return h.hexdigest()


def canonical(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), so identities compare equal after a round trip."""
    return json.loads(json.dumps(value, sort_keys=True))


def identity_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two identities differ, e.g. ["seed", "scheduler.num_sampling_steps"]."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += identity_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


@dataclass(frozen=True)
class OutputStatus:
    state: str  # "complete", "missing" (nothing usable: generate it), "broken" (redo it), "differs" (another video)
    detail: list[str]  # why: differing fields for "differs", the problem for "broken"

    @property
    def complete(self) -> bool:
        return self.state == "complete"


def check_output(out: OutputPaths, identity: dict[str, Any], with_latent: bool, hashes: bool = True) -> OutputStatus:
    """Whether `out` holds the whole video with this identity. `hashes=False` checks sizes only (summaries)."""
    if not out.record.is_file():
        return OutputStatus("missing", [])
    try:
        record = json.loads(out.record.read_text())
        if not isinstance(record, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        return OutputStatus("broken", [f"unreadable record {out.record.name}: {exc}"])
    if "identity" not in record:
        return OutputStatus("differs", ["identity (the record was written by an older version)"])
    fields = identity_diff(record["identity"], canonical(identity))
    if fields:
        return OutputStatus("differs", fields)
    files = [("video", out.video)] + ([("latent", out.latent)] if with_latent else [])
    for kind, path in files:
        problem = _file_problem(record, kind, path, hashes)
        if problem:
            return OutputStatus("broken", [problem])
    return OutputStatus("complete", [])


def _file_problem(record: dict[str, Any], kind: str, path: Path, hashes: bool) -> str | None:
    """Why the file of `kind` is not the one the record describes, or None when it is."""
    size, sha = record.get(f"{kind}_bytes"), record.get(f"{kind}_sha256")
    if not path.is_file():
        return f"{path.name} is missing"
    if size is None or sha is None:
        return f"the record has no {kind}_bytes / {kind}_sha256"
    if path.stat().st_size != size:
        return f"{path.name} has {path.stat().st_size} bytes, the record says {size} (truncated or replaced)"
    if hashes and file_digest(path)["sha256"] != sha:
        return f"{path.name} does not match the SHA-256 in its record"
    return None
