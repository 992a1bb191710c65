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
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EXCLUDE_FLAG",
    "PAIR_FIELDS",
    "EvalError",
    "FolderScan",
    "Mismatch",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_file",
    "check_output_folder",
    "compare_costs",
    "excluded_names",
    "find_mismatches",
    "fmt",
    "markdown_table",
    "mean",
    "median",
    "number_or_none",
    "pair_problems",
    "parse_named_paths",
    "read_record",
    "read_records",
    "scan_folder",
    "settle_mismatches",
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


def _writable_folder(folder: Path, flag: str, path: str) -> None:
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise EvalError(
            f"{flag} {path!r}: its folder {str(folder)!r} {what}; allowed: a path in an existing, writable folder"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EvalError(f"{flag} {path!r}: the folder {str(folder)!r} is not writable; allowed: a writable folder")


def check_output_file(path: str, flag: str) -> Path:
    """An output file named by `flag`, checked before any work: not empty, not a folder, in an existing
    writable folder (duca_video.cli_checks.output_file's rules; this module imports nothing of duca_video)."""
    if not path.strip():
        raise EvalError(f"{flag} {path!r}: allowed: a file path")
    target = Path(path).expanduser()
    if target.is_dir() or path.endswith(("/", os.sep)):
        raise EvalError(f"{flag} {path!r} is a folder; allowed: a file path (the file is written there)")
    if target.exists() and not os.access(target, os.W_OK):
        raise EvalError(f"{flag} {path!r}: the file exists and is not writable; allowed: a writable file path")
    _writable_folder(target.parent, flag, path)
    return target


def check_output_folder(path: str, flag: str) -> Path:
    """An output folder named by `flag` (created if missing), checked before any work: not empty, not a file,
    and it (or the nearest existing folder above it) is a writable folder."""
    if not path.strip():
        raise EvalError(f"{flag} {path!r}: allowed: a folder path")
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise EvalError(f"{flag} {path!r} is a file; allowed: a folder (created if missing)")
    existing = next((f for f in (target, *target.parents) if f.exists()), Path("."))
    _writable_folder(existing, flag, path)
    return target


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


# The per-video costs the evaluation scripts read from a record: a number, or null where not measured.
COST_FIELDS = ("latency_s", "dit_tflops", "peak_memory_bytes", "cache_bytes")


def check_costs(record: dict[str, Any], path: str | os.PathLike) -> None:
    """A record whose cost field holds another type (a string, a list, true) is an error naming the field:
    it would otherwise count as not measured."""
    for key in COST_FIELDS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise EvalError(
                f"record {str(path)!r}: {key} is {_show(value)}; allowed: a number, or null when not measured"
            )


@dataclass(frozen=True)
class FolderScan:
    """The videos of one folder: {name: record} for NAME.mp4 with its NAME.json, and the names of the mp4 files
    that have no record (a writer killed before its record, or a file copied in by hand)."""

    folder: Path
    records: dict[str, dict[str, Any]]
    orphans: frozenset[str] = field(default_factory=frozenset)

    @property
    def videos(self) -> set[str]:
        return set(self.records) | self.orphans


def scan_folder(folder: str | os.PathLike) -> FolderScan:
    """Every NAME.mp4 of `folder` and its NAME.json. Other JSON files (manifests) have no mp4 and are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"video folder {str(folder)!r} does not exist")
    records, orphans = {}, set()
    for video in sorted(folder.glob("*.mp4")):
        if video.name.startswith("."):  # temporary files of a writer still at work
            continue
        record = video.with_suffix(".json")
        if record.is_file():
            records[video.stem] = read_record(record)
            check_costs(records[video.stem], record)
        else:
            orphans.add(video.stem)
    return FolderScan(folder, records, frozenset(orphans))


def read_records(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{name: record} for every complete video in `folder` (NAME.mp4 with its NAME.json, see scan_folder)."""
    return scan_folder(folder).records


# ---------------------------------------------------------------------------------------------------- pairing
# What makes two videos of one name the same video: the same conditioning, noise, size and length. A method
# changes how the video is sampled, never these; a difference means the pair compares different videos.
PAIR_FIELDS = ("prompt", "text", "seed", "image_size", "video_size", "frames", "fps")
EXCLUDE_FLAG = "--exclude-mismatched"
_ABSENT = object()


@dataclass(frozen=True)
class Mismatch:
    """A (reference, method) pair of one name that is not a pair; method None: the reference video itself is
    unusable, for every method."""

    method: str | None
    name: str
    problems: tuple[str, ...]

    def describe(self) -> str:
        who = "reference video" if self.method is None else f"method {self.method!r}, video"
        return f"{who} {self.name!r}: {'; '.join(self.problems)}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "name": self.name, "problems": list(self.problems)}


def _show(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def pair_problems(reference: dict[str, Any], method: dict[str, Any]) -> list[str]:
    """One line per PAIR_FIELDS field on which the two records differ (a field absent from a record differs: a
    pair that cannot be checked is not trusted)."""
    out = []
    for key in PAIR_FIELDS:
        ref, other = reference.get(key, _ABSENT), method.get(key, _ABSENT)
        if ref is _ABSENT or other is _ABSENT or ref != other:
            out.append(f"{key} differs: reference {_show(ref)}, method {_show(other)}")
    return out


def _sha256(path: Path) -> str:
    from duca_video.io.files import file_digest  # here: --list and other torch-free commands import this module

    return file_digest(path)["sha256"]


def record_problems(folder: Path, name: str, record: dict[str, Any] | None, digest: bool) -> list[str]:
    """Whether NAME.mp4 is the video its record describes: the record exists, names this file, and (where the
    record holds them) the file's size and sha256 agree. `digest` False skips the hash (it reads the file)."""
    video = folder / f"{name}.mp4"
    if record is None:
        return [f"no record {name}.json beside {str(video)!r}"]
    files = record.get("files")
    entry = files.get("video") if isinstance(files, dict) else None
    if isinstance(entry, dict):
        recorded, size, sha = entry.get("name"), entry.get("bytes", entry.get("size")), entry.get("sha256")
    else:
        recorded, size, sha = entry, record.get("video_bytes"), record.get("video_sha256")
    out = []
    if isinstance(recorded, str) and recorded != video.name:
        out.append(f"its record describes {recorded!r}, not {video.name!r}")
    if isinstance(size, int) and not isinstance(size, bool) and video.stat().st_size != size:
        out.append(f"{str(video)!r} has {video.stat().st_size} bytes, its record says {size}")
    elif digest and isinstance(sha, str) and _sha256(video) != sha.lower():
        out.append(f"{str(video)!r} does not have the sha256 its record gives ({sha})")
    return out


def find_mismatches(
    reference: FolderScan, methods: dict[str, FolderScan], names: Iterable[str], digest: bool = True
) -> list[Mismatch]:
    """Every name (of `names`) whose reference video is unusable, and every (method, name) whose videos do not
    correspond: a missing record, a file that is not its record's, a PAIR_FIELDS difference. Names a method
    lacks altogether are not mismatches (a partial run; the callers count them as missing)."""
    names = [n for n in names if n in reference.videos]
    out, bad = [], set()
    for name in names:
        problems = record_problems(reference.folder, name, reference.records.get(name), digest)
        if problems:
            out.append(Mismatch(None, name, tuple(problems)))
            bad.add(name)
    for method, scan in methods.items():
        for name in (n for n in names if n not in bad and n in scan.videos):
            record = scan.records.get(name)
            problems = record_problems(scan.folder, name, record, digest)
            if record is not None:
                problems += pair_problems(reference.records[name], record)
            if problems:
                out.append(Mismatch(method, name, tuple(problems)))
    return out


def excluded_names(mismatches: Iterable[Mismatch], method: str) -> set[str]:
    """The names left out of `method`'s comparison: its own mismatches and the reference's unusable videos."""
    return {m.name for m in mismatches if m.method in (None, method)}


def settle_mismatches(mismatches: list[Mismatch], exclude: bool, shown: int = 10) -> None:
    """No mismatch: nothing to do. Otherwise an error listing them (the first `shown`), or, with `exclude`
    (the EXCLUDE_FLAG flag), each one on stderr; the caller then leaves them out."""
    if not mismatches:
        return
    if exclude:
        for m in mismatches:
            print(f"excluded ({EXCLUDE_FLAG}): {m.describe()}", file=sys.stderr)
        return
    lines = [m.describe() for m in mismatches[:shown]]
    if len(mismatches) > shown:
        lines.append(f"... and {len(mismatches) - shown} more")
    listed = "\n  ".join(lines)
    raise EvalError(
        f"{len(mismatches)} video pair(s) do not compare the same video (same name, other prompt, "
        f"seed, size or file):\n  {listed}\n"
        f"regenerate them, or pass {EXCLUDE_FLAG} to leave them out (listed in the outputs)"
    )


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
    video weighs by its cost; a missing measurement on either side drops that video from that ratio only).

    A name whose two records differ on a PAIR_FIELDS field is an error: its costs are those of another video
    (callers leave such pairs out first, see find_mismatches)."""
    common = sorted(set(reference) & set(method))
    for name in common:
        problems = pair_problems(reference[name], method[name])
        if problems:
            raise EvalError(
                f"video {name!r}: the records do not describe the same video ({'; '.join(problems)}); "
                "its costs cannot be compared"
            )
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
