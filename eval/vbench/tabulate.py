"""VBench's total, quality and semantic scores from the per-dimension results VBench wrote.

    python eval/vbench/tabulate.py --score-dir DIR [--full-info VBench_full_info.json] [--allow-missing]

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
A dimension whose per-video results cover fewer videos than the suite lists for it is an error naming it and
both counts; with --allow-partial it is marked partial and, like a missing one, leaves its groups null. The
suite: --full-info, else the one score.py recorded in DIR/suite.json; with neither, the coverage cannot be
checked, which is said on stderr and in scaled_results.json ("suite": null).
Standard library only: runs in either environment.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import `eval.` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from eval.common import EvalError, atomic_write_json, fmt, markdown_table
from eval.vbench.cli import Parser, check_output_dir, nonempty, positive_int, run_script, say
from eval.vbench.protocol import (
    DIMENSIONS,
    NORMALIZATION,
    NUM_SAMPLES,
    QUALITY_DIMENSIONS,
    QUALITY_WEIGHT,
    SEMANTIC_DIMENSIONS,
    SEMANTIC_WEIGHT,
    dimension_videos,
    load_suite,
)
from eval.vbench.results import (
    RESULTS_SUFFIX,
    SUITE_RECORD,
    Coverage,
    DimensionResult,
    coverage,
    read_results_file,
    read_suite_record,
)


def read_results(score_dir: Path) -> dict[str, DimensionResult]:
    """{dimension: its result} over every results file in `score_dir`, in VBench's dimension order."""
    if not score_dir.is_dir():
        raise EvalError(f"score folder {str(score_dir)!r} does not exist")
    files = sorted(score_dir.glob(f"*{RESULTS_SUFFIX}"))
    if not files:
        raise EvalError(f"no *{RESULTS_SUFFIX} in {str(score_dir)!r} (VBench writes NAME{RESULTS_SUFFIX} there)")
    found: dict[str, DimensionResult] = {}
    for path in files:
        for dim, result in read_results_file(path).items():
            check_raw(dim, result.aggregate, path)
            if dim in found and found[dim].aggregate != result.aggregate:
                raise EvalError(
                    f"dimension {dim!r} is in both {found[dim].path.name!r} ({found[dim].aggregate}) and "
                    f"{path.name!r} ({result.aggregate}); remove the stale one"
                )
            found.setdefault(dim, result)
    return {d: found[d] for d in DIMENSIONS if d in found}


def check_raw(dim: str, value: float, path: Path) -> None:
    """VBench's raw aggregates are fractions in [0, 1]; anything else (a percentage, NaN from an empty or broken
    run) would go into the totals as a plausible-looking number."""
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise EvalError(
            f"{str(path)!r}: dimension {dim!r} scores {value}, outside [0, 1] (VBench's raw aggregates "
            "are fractions; a percentage or a failed run?)"
        )


def normalized(dim: str, raw: float) -> float:
    low, high, weight = NORMALIZATION[dim]
    return (raw - low) / (high - low) * weight


def scale(
    raw: dict[str, float], allow_missing: bool = False, where: str = "", partial: dict[str, Coverage] | None = None
) -> dict[str, Any]:
    """VBench's scores, in percent, from the raw aggregates (see the module docstring). A group with a missing or
    partial dimension is null: a sum over fewer dimensions, or over fewer videos, is not VBench's score."""
    missing = [d for d in DIMENSIONS if d not in raw]
    if missing and not allow_missing:
        raise EvalError(
            f"missing dimension(s){' in ' + where if where else ''}: {', '.join(missing)}; score them "
            "(eval/vbench/score.py --dimensions ...) or pass --allow-missing"
        )
    partial = partial or {}
    norm = {d: normalized(d, v) for d, v in raw.items()}

    def group(dims: Sequence[str]) -> float | None:
        if any(d not in norm or d in partial for d in dims):
            return None
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
        "partial": {d: {"videos": c.covered, "suite": c.listed} for d, c in partial.items()},
        "complete": not missing and not partial,
    }


def suite_videos(args: Any, score_dir: Path) -> tuple[dict[str, frozenset[str]] | None, str]:
    """({dimension: the videos the suite lists for it}, which suite) or (None, why there is none)."""
    record = read_suite_record(score_dir)
    if args.full_info:
        full_info, num = Path(args.full_info), args.num_samples or NUM_SAMPLES
    elif record is not None:
        full_info, num = record[0], args.num_samples or record[1]
    else:  # not the installed vbench's: the results may be of another suite, and this must not depend on the env
        return None, f"no --full-info, and {str(score_dir / SUITE_RECORD)!r} (written by score.py) is not there"
    return dimension_videos(load_suite(full_info), num), f"{full_info}, {num} videos per prompt"


def check_coverage(
    results: dict[str, DimensionResult], expected: dict[str, frozenset[str]], allow_partial: bool
) -> dict[str, Coverage]:
    """{dimension: its coverage} for the dimensions scored on fewer videos than the suite lists (an error unless
    allow_partial); results holding videos the suite does not list for them are always an error."""
    partial = {}
    for dim, result in results.items():
        found = coverage(result, expected.get(dim, frozenset()))
        if found.extra:
            raise EvalError(f"dimension {dim!r} ({str(result.path)!r}): {found.describe()}")
        if found.missing:
            partial[dim] = found
    if partial and not allow_partial:
        what = "; ".join(
            f"{d!r} on {c.covered} of the {c.listed} videos the suite lists for it "
            f"({results[d].path.name}{', ' + c.note if c.note else ''})"
            for d, c in partial.items()
        )
        raise EvalError(
            f"dimension(s) scored on fewer videos than the suite lists: {what}; score them again "
            "(eval/vbench/score.py) or pass --allow-partial"
        )
    return partial


def table(scaled: dict[str, Any]) -> str:
    partial = scaled.get("partial", {})
    rows = [[key, fmt(scaled[key], ".2f")] for key in ("total", "quality", "semantic")]
    for d in DIMENSIONS:
        mark = f" (partial: {partial[d]['videos']} of {partial[d]['suite']} videos)" if d in partial else ""
        rows.append([d, fmt(scaled["dimensions"][d], ".2f") + mark])
    text = markdown_table(["score (%)", "value"], rows)
    if scaled["missing"]:
        text += f"\nmissing: {', '.join(scaled['missing'])}\n"
    if partial:
        text += f"\npartial (--allow-partial; their groups are null): {', '.join(partial)}\n"
    return text


def build_parser() -> Parser:
    p = Parser(prog="eval/vbench/tabulate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--score-dir", required=True, type=nonempty, help="folder of VBench's *_eval_results.json files")
    p.add_argument(
        "--out", type=nonempty, help="folder for all_results.json and scaled_results.json (default: --score-dir)"
    )
    p.add_argument(
        "--full-info",
        type=nonempty,
        help="VBench_full_info.json the videos were scored against "
        "(default: the one score.py recorded in SCORE_DIR/suite.json)",
    )
    p.add_argument(
        "--num-samples",
        type=positive_int,
        help=f"videos per prompt (default: the record's, else VBench's {NUM_SAMPLES})",
    )
    p.add_argument("--allow-missing", action="store_true", help="tabulate without some dimensions (named in output)")
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="tabulate dimensions scored on fewer videos than the suite lists (marked partial)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    score_dir = Path(args.score_dir)
    try:
        out = check_output_dir(args.out or score_dir, "--out" if args.out else "--score-dir")
        results = read_results(score_dir)
        expected, suite = suite_videos(args, score_dir)
        partial = check_coverage(results, expected, args.allow_partial) if expected is not None else {}
        raw = {d: r.aggregate for d, r in results.items()}
        scaled = scale(raw, args.allow_missing, str(score_dir), partial)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if expected is None:
        print(f"warning: coverage not checked (no suite: {suite})", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    sources = {d: r.path.name for d, r in results.items()}
    atomic_write_json(out / "all_results.json", raw)
    atomic_write_json(
        out / "scaled_results.json", {**scaled, "suite": suite if expected is not None else None, "sources": sources}
    )
    say(table(scaled), end="")
    say(f"wrote {out / 'all_results.json'} and {out / 'scaled_results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
