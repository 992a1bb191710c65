"""Helpers shared by the evaluation scripts, standard library only.

The scoring side runs in VBench's own environment, where neither torch of our version nor duca_video may be
installed, so nothing here imports them. Files are written as duca_video.io does: under a temporary name in the
same folder, then renamed, so a killed script never leaves a half-written result under its final name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "EvalError",
    "atomic_write_json",
    "atomic_write_text",
    "compare_costs",
    "fmt",
    "markdown_table",
    "mean",
    "median",
    "number_or_none",
    "parse_named_paths",
    "read_record",
    "read_records",
]


class EvalError(ValueError):
    """Unusable input to an evaluation script; the message names the file, the field and what is allowed."""


@contextlib.contextmanager
def _atomic(final: Path) -> Iterator[Path]:
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:  # the data must be on disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with _atomic(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """JSON with +-inf written as the strings "inf" / "-inf" (JSON has no infinity; PSNR of identical videos is)."""
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2, ensure_ascii=False) + "\n")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def parse_named_paths(text: str, flag: str) -> dict[str, Path]:
    """`name=DIR,name=DIR` -> {name: Path}; names must be unique and non-empty."""
    out: dict[str, Path] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise EvalError(f"{flag} {item!r}: expected NAME=PATH (several separated by commas)")
        if name in out:
            raise EvalError(f"{flag}: the name {name!r} is given twice")
        out[name] = Path(path).expanduser()
    if not out:
        raise EvalError(f"{flag}: no NAME=PATH given")
    return out


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """One per-video record (NAME.json written by the pipeline next to NAME.mp4)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvalError(f"record {str(path)!r} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise EvalError(f"record {str(path)!r}: expected a JSON object, got {type(data).__name__}")
    return data


def read_records(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{name: record} for every complete video in `folder`: NAME.mp4 with its NAME.json (the pipeline writes the
    record last, so a record marks a finished video). Other JSON files (manifests) have no mp4 and are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"video folder {str(folder)!r} does not exist")
    records = {}
    for video in sorted(folder.glob("*.mp4")):
        if video.name.startswith("."):  # temporary files of a writer still at work
            continue
        record = video.with_suffix(".json")
        if record.is_file():
            records[video.stem] = read_record(record)
    return records


def _numbers(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are present (None when none is); +inf when any is +inf."""
    xs = _numbers(values)
    return math.fsum(xs) / len(xs) if xs else None


def median(values: Iterable[float | None]) -> float | None:
    xs = sorted(_numbers(values))
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def number_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def compare_costs(reference: dict[str, dict[str, Any]], method: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Cost of a method against the reference over the videos both have, from the per-video records: means of
    latency_s, dit_tflops, peak_memory_bytes and cache_bytes, and speed-ups as ratios of the summed costs (every
    video weighs by its cost; a missing measurement on either side drops that video from that ratio only)."""
    common = sorted(set(reference) & set(method))
    out: dict[str, Any] = {"videos": len(method), "common": len(common)}
    for key, label in (("latency_s", "latency"), ("dit_tflops", "flops")):
        pairs = [(number_or_none(reference[n].get(key)), number_or_none(method[n].get(key))) for n in common]
        pairs = [(r, m) for r, m in pairs if r is not None and m is not None]
        out[f"{key}_mean"] = mean(m for _, m in pairs)
        out[f"reference_{key}_mean"] = mean(r for r, _ in pairs)
        total = math.fsum(m for _, m in pairs)
        out[f"{label}_speedup"] = math.fsum(r for r, _ in pairs) / total if pairs and total > 0 else None
    for key in ("peak_memory_bytes", "cache_bytes"):
        out[f"{key}_mean"] = mean(number_or_none(method[n].get(key)) for n in common)
    return out


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(value: Any, spec: str = ".3f") -> str:
    """A table cell: '-' for a missing value, 'inf' for infinity."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)
