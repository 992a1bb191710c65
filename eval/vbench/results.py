"""VBench's result files, read and checked against the suite (standard library only).

VBench 0.1.5's `evaluate(videos_path, name, dimension_list=...)` writes, into its output folder:
- NAME_full_info.json first: the suite's entries for those dimensions, each with the `video_list` it found;
- NAME_eval_results.json at the end: `{dimension: [aggregate, [{"video_path": ..., "video_results": ...}, ...]]}`.
A dimension is scored only when its aggregate is a finite fraction and its per-video entries cover every video
the suite lists for it. One exception, color (vbench/color.py): it adds a video's entry only when GRiT found the
object in it, so its coverage is the videos that run was given (its NAME_full_info.json).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from eval.common import EvalError, atomic_write_json
from eval.vbench.protocol import DIMENSIONS, NORMALIZATION, suite_digest

__all__ = [
    "RESULTS_SUFFIX",
    "SUITE_RECORD",
    "Coverage",
    "DimensionResult",
    "coverage",
    "read_results_file",
    "read_suite_record",
    "unscored_reason",
    "write_suite_record",
]

RESULTS_SUFFIX = "_eval_results.json"
INPUTS_SUFFIX = "_full_info.json"
SUITE_RECORD = "suite.json"  # written by score.py into the score folder: which suite the results are for
LISTS_DETECTED_ONLY = ("color",)


@dataclass(frozen=True)
class DimensionResult:
    dimension: str
    aggregate: float
    videos: frozenset[str]  # names (file name without extension) of its per-video entries
    path: Path  # the NAME_eval_results.json it came from


def video_key(video_path: str) -> str:
    """`.../{prompt}-{k}.mp4` -> `{prompt}-{k}` (VBench joins paths with '/'; a prompt may hold dots)."""
    return os.path.splitext(PurePosixPath(video_path).name)[0]


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvalError(f"{str(path)!r} cannot be read as JSON: {exc}") from None


def read_results_file(path: Path) -> dict[str, DimensionResult]:
    """Every dimension of one NAME_eval_results.json, its structure checked (errors name the file and field)."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise EvalError(f"{str(path)!r}: expected an object {{dimension: [aggregate, [...]]}}")
    return {dim: _dimension(path, dim, value) for dim, value in data.items()}


def _dimension(path: Path, dim: str, value: Any) -> DimensionResult:
    if dim not in NORMALIZATION:
        raise EvalError(f"{str(path)!r}: unknown dimension {dim!r}; allowed: {', '.join(DIMENSIONS)}")
    first = value[0] if isinstance(value, list) and value else None
    if isinstance(first, bool) or not isinstance(first, (int, float)) or len(value) != 2:
        raise EvalError(
            f"{str(path)!r}: field {dim!r} must be [aggregate number, [per-video results]], got {str(value)[:80]}"
        )
    if not isinstance(value[1], list):
        raise EvalError(f"{str(path)!r}: field {dim!r}: the per-video results must be a list, got {str(value[1])[:80]}")
    names = []
    for i, item in enumerate(value[1]):
        video = item.get("video_path") if isinstance(item, dict) else None
        if not isinstance(video, str) or not video.strip():
            raise EvalError(
                f"{str(path)!r}: field {dim!r}, per-video result {i}: expected an object with a "
                f"non-empty string 'video_path', got {str(item)[:80]}"
            )
        names.append(video_key(video))
    return DimensionResult(dim, float(first), frozenset(names), path)


def given_videos(result: DimensionResult) -> frozenset[str] | None:
    """The videos VBench was given for the dimension in the run that wrote `result`, from the NAME_full_info.json
    written at that run's start; None when it is not there, or newer than the results (a later, unfinished run)."""
    meta = result.path.with_name(result.path.name[: -len(RESULTS_SUFFIX)] + INPUTS_SUFFIX)
    try:
        if meta.stat().st_mtime_ns > result.path.stat().st_mtime_ns:
            return None
    except OSError:
        return None
    data = _load_json(meta)
    if not isinstance(data, list):
        raise EvalError(f"{str(meta)!r}: expected a JSON list of entries (VBench's {INPUTS_SUFFIX})")
    names = set()
    for i, entry in enumerate(data):
        dims = entry.get("dimension") if isinstance(entry, dict) else None
        videos = entry.get("video_list", []) if isinstance(entry, dict) else None
        videos = [videos] if isinstance(videos, str) else videos
        if not isinstance(dims, list) or not isinstance(videos, list) or not all(isinstance(v, str) for v in videos):
            raise EvalError(
                f"{str(meta)!r}, entry {i}: expected 'dimension' (a list) and 'video_list' (paths), "
                f"got {str(entry)[:80]}"
            )
        if result.dimension in dims:
            names.update(video_key(v) for v in videos)
    return frozenset(names)


@dataclass(frozen=True)
class Coverage:
    dimension: str
    covered: int  # videos of the suite's list for the dimension that the result covers
    listed: int  # videos the suite lists for it
    missing: tuple[str, ...]
    extra: tuple[str, ...]  # videos in the result that the suite does not list for it
    note: str = ""

    @property
    def complete(self) -> bool:
        return not self.missing and not self.extra

    def describe(self) -> str:
        if self.extra:
            return (
                f"its results hold {len(self.extra)} video(s) the suite does not list for it, e.g. "
                f"{self.extra[0] + '.mp4'!r}: scored against another suite or --num-samples"
            )
        text = f"its results cover {self.covered} of the {self.listed} videos the suite lists for it"
        if self.missing:
            text += f", e.g. no result for {self.missing[0] + '.mp4'!r}"
        return text + (f" ({self.note})" if self.note else "")


def coverage(result: DimensionResult, expected: frozenset[str]) -> Coverage:
    scored, note = result.videos, ""
    if result.dimension in LISTS_DETECTED_ONLY:
        given = given_videos(result)
        if given is None:
            meta = result.path.name[: -len(RESULTS_SUFFIX)] + INPUTS_SUFFIX
            note = (
                f"{result.dimension} lists only the videos where VBench found the object; the videos it was "
                f"given are read from {meta}, which is missing or newer than the results"
            )
        else:
            scored = scored | given
    missing, extra = sorted(expected - scored), sorted(scored - expected)
    return Coverage(result.dimension, len(expected) - len(missing), len(expected), tuple(missing), tuple(extra), note)


def unscored_reason(score_dir: Path, dim: str, expected: frozenset[str]) -> str | None:
    """None when SCORE_DIR/DIM_eval_results.json holds a finite score in [0, 1] over every video in `expected`;
    otherwise why the dimension is not scored."""
    path = score_dir / f"{dim}{RESULTS_SUFFIX}"
    if not path.exists():
        return "no results yet"
    try:
        result = read_results_file(path).get(dim)
        if result is None:
            return f"{path.name} has no entry for it"
        if not math.isfinite(result.aggregate) or not 0.0 <= result.aggregate <= 1.0:
            return f"its score is {result.aggregate}, not a finite fraction (a failed or empty run)"
        found = coverage(result, expected)
    except EvalError as exc:
        return f"its results cannot be used: {exc}"
    return None if found.complete else found.describe()


# ---------------------------------------------------------------------------------------------------- suite record
def write_suite_record(score_dir: Path, full_info: Path, num_samples: int) -> None:
    record = {"full_info": str(full_info), "sha256": suite_digest(full_info), "num_samples": num_samples}
    atomic_write_json(score_dir / SUITE_RECORD, record)


def read_suite_record(score_dir: Path) -> tuple[Path, int] | None:
    """(full-info file, videos per prompt) the folder was scored with by score.py; None if it has no record."""
    path = score_dir / SUITE_RECORD
    if not path.exists():
        return None
    data = _load_json(path)
    fields = data if isinstance(data, dict) else {}
    full_info, digest, num = fields.get("full_info"), fields.get("sha256"), fields.get("num_samples")
    if (
        not isinstance(full_info, str)
        or not isinstance(digest, str)
        or isinstance(num, bool)
        or not isinstance(num, int)
        or num < 1
    ):
        raise EvalError(
            f"{str(path)!r}: expected {{'full_info': path, 'sha256': hex, 'num_samples': int >= 1}}, "
            f"got {str(data)[:120]}"
        )
    if not Path(full_info).is_file():
        raise EvalError(f"{str(path)!r} names the suite {full_info!r}, which is not there; pass --full-info")
    if suite_digest(full_info) != digest:
        raise EvalError(
            f"{str(path)!r}: the suite {full_info!r} changed since scoring (sha256 differs); pass --full-info"
        )
    return Path(full_info), num
