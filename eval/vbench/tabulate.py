"""VBench's total, quality and semantic scores from the per-dimension results VBench wrote.

    python eval/vbench/tabulate.py --score-dir DIR [--allow-missing]

Reads every `*_eval_results.json` in DIR (`{dimension: [aggregate, [per-video results]]}`, as VBench's
`evaluate()` writes them) and writes, into DIR (or --out):
  all_results.json     {dimension: aggregate}, the raw values (0..1), in VBench's dimension order
  scaled_results.json  percentages: total, quality, semantic, each dimension's raw value x 100 (as VBench's
                       tables show them) and its normalised, weighted value x 100 (what the totals add up)
Normalisation (VBench 1.0): norm = (raw - min) / (max - min) * weight; quality = sum of the quality norms / 6.5,
semantic = sum of the semantic norms / 9, total = (4 * quality + semantic) / 5.

A raw aggregate outside [0, 1], or not finite, is an error naming the dimension, the file and the value.
A dimension with no result is an error naming it (VBench's own script would count it as 0). With --allow-missing
it is listed under "missing", and the scores of any group it belongs to are null rather than a smaller number.
Standard library only: runs in either environment.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import `eval.` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from eval.common import EvalError, atomic_write_json, fmt, markdown_table
from eval.vbench.protocol import (
    DIMENSIONS,
    NORMALIZATION,
    QUALITY_DIMENSIONS,
    QUALITY_WEIGHT,
    SEMANTIC_DIMENSIONS,
    SEMANTIC_WEIGHT,
)

RESULTS_SUFFIX = "_eval_results.json"


def read_results(score_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """({dimension: raw aggregate}, {dimension: file it came from}) over every results file in `score_dir`."""
    if not score_dir.is_dir():
        raise EvalError(f"score folder {str(score_dir)!r} does not exist")
    files = sorted(score_dir.glob(f"*{RESULTS_SUFFIX}"))
    if not files:
        raise EvalError(f"no *{RESULTS_SUFFIX} in {str(score_dir)!r} (VBench writes NAME{RESULTS_SUFFIX} there)")
    raw: dict[str, float] = {}
    source: dict[str, str] = {}
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EvalError(f"{str(path)!r} cannot be read as JSON: {exc}") from None
        if not isinstance(data, dict):
            raise EvalError(f"{str(path)!r}: expected an object {{dimension: [aggregate, [...]]}}")
        for dim, value in data.items():
            if dim not in NORMALIZATION:
                raise EvalError(f"{str(path)!r}: unknown dimension {dim!r}; allowed: {', '.join(DIMENSIONS)}")
            first = value[0] if isinstance(value, list) and value else None
            if isinstance(first, bool) or not isinstance(first, (int, float)):
                raise EvalError(f"{str(path)!r}: field {dim!r} must be [aggregate number, [per-video results]], "
                                f"got {str(value)[:80]}")  # fmt: skip
            check_raw(dim, first, path)
            if dim in raw and raw[dim] != first:
                raise EvalError(f"dimension {dim!r} is in both {source[dim]!r} ({raw[dim]}) and {path.name!r} "
                                f"({first}); remove the stale one")  # fmt: skip
            raw[dim], source[dim] = float(first), path.name
    return {d: raw[d] for d in DIMENSIONS if d in raw}, source


def check_raw(dim: str, value: float, path: Path) -> None:
    """VBench's raw aggregates are fractions in [0, 1]; anything else (a percentage, NaN from an empty or broken
    run) would go into the totals as a plausible-looking number."""
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise EvalError(f"{str(path)!r}: dimension {dim!r} scores {value}, outside [0, 1] (VBench's raw aggregates "
                        "are fractions; a percentage or a failed run?)")  # fmt: skip


def normalized(dim: str, raw: float) -> float:
    low, high, weight = NORMALIZATION[dim]
    return (raw - low) / (high - low) * weight


def scale(raw: dict[str, float], allow_missing: bool = False, where: str = "") -> dict[str, Any]:
    """VBench's scores, in percent, from the raw aggregates (see the module docstring)."""
    missing = [d for d in DIMENSIONS if d not in raw]
    if missing and not allow_missing:
        raise EvalError(f"missing dimension(s){' in ' + where if where else ''}: {', '.join(missing)}; score them "
                        "(eval/vbench/score.py --dimensions ...) or pass --allow-missing")  # fmt: skip
    norm = {d: normalized(d, v) for d, v in raw.items()}

    def group(dims: Sequence[str]) -> float | None:
        if any(d not in norm for d in dims):
            return None  # a partial sum is not VBench's score
        return math.fsum(norm[d] for d in dims) / math.fsum(NORMALIZATION[d][2] for d in dims)

    quality, semantic = group(QUALITY_DIMENSIONS), group(SEMANTIC_DIMENSIONS)
    total = None
    if quality is not None and semantic is not None:
        total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)

    def pct(x: float | None) -> float | None:
        return None if x is None else 100 * x

    return {
        "total": pct(total),
        "quality": pct(quality),
        "semantic": pct(semantic),
        "dimensions": {d: pct(raw.get(d)) for d in DIMENSIONS},
        "normalized_dimensions": {d: pct(norm.get(d)) for d in DIMENSIONS},
        "missing": missing,
        "complete": not missing,
    }


def table(scaled: dict[str, Any]) -> str:
    rows = [[key, fmt(scaled[key], ".2f")] for key in ("total", "quality", "semantic")]
    rows += [[d, fmt(scaled["dimensions"][d], ".2f")] for d in DIMENSIONS]
    text = markdown_table(["score (%)", "value"], rows)
    if scaled["missing"]:
        text += f"\nmissing: {', '.join(scaled['missing'])}\n"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eval/vbench/tabulate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--score-dir", required=True, help="folder of VBench's *_eval_results.json files")
    p.add_argument("--out", help="folder for all_results.json and scaled_results.json (default: --score-dir)")
    p.add_argument("--allow-missing", action="store_true", help="tabulate without some dimensions (named in output)")
    args = p.parse_args(argv)
    score_dir = Path(args.score_dir)
    try:
        raw, source = read_results(score_dir)
        scaled = scale(raw, args.allow_missing, str(score_dir))
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else score_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "all_results.json", raw)
    atomic_write_json(out / "scaled_results.json", {**scaled, "sources": source})
    print(table(scaled), end="")
    print(f"wrote {out / 'all_results.json'} and {out / 'scaled_results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
