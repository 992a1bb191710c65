"""Methods side by side: latency, DiT FLOPs, speed-ups, memory, VBench scores and fidelity, as a markdown table.

    python eval/report.py --reference samples/vbench/none --methods duca=samples/vbench/duca,toca=... \\
        --vbench none=scores/none,duca=scores/duca --fidelity fidelity/fidelity_summary.json --out report.md

- Costs come from the per-video JSON records (NAME.json next to NAME.mp4) of each folder: means over the videos
  a method shares with the reference, speed-ups as summed reference cost / summed method cost over them.
- A shared name whose records differ on prompt, text, seed, image_size, video_size, frames or fps (another video,
  whose costs say nothing), or a video without its record, is an error; --exclude-mismatched leaves those out
  and lists them under the table.
- --vbench NAME=PATH: PATH is scaled_results.json or the score folder holding it (eval/vbench/tabulate.py).
- --fidelity: fidelity_summary.json from eval/fidelity.py (mean PSNR, SSIM, LPIPS against the reference).
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import `eval.` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from eval.common import (
    EXCLUDE_FLAG,
    EvalError,
    Mismatch,
    atomic_write_text,
    check_output_file,
    compare_costs,
    excluded_names,
    find_mismatches,
    fmt,
    markdown_table,
    parse_named_paths,
    scan_folder,
    settle_mismatches,
)

HEADERS = [
    "method",
    "videos",
    "latency (s)",
    "latency speed-up",
    "DiT TFLOPs",
    "FLOPs speed-up",
    "peak mem (GiB)",
    "cache (MiB)",
    "VBench total",
    "quality",
    "semantic",
    "PSNR",
    "SSIM",
    "LPIPS",
]


def load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise EvalError(f"{what} {str(path)!r} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EvalError(f"{what} {str(path)!r}: expected a JSON object")
    return data


def _score(value: Any) -> bool:
    """A score as the JSON files write it: a number, "inf" (eval/common.atomic_write_json's infinity) or null."""
    return value is None or value == "inf" or (isinstance(value, (int, float)) and not isinstance(value, bool))


def load_vbench(path: Path) -> dict[str, Any]:
    path = path / "scaled_results.json" if path.is_dir() else path
    data = load_json(path, "VBench results")
    for key in ("total", "quality", "semantic"):
        if key not in data:
            raise EvalError(f"VBench results {str(path)!r}: no field {key!r} (expected eval/vbench/tabulate.py output)")
        if not _score(data[key]):
            raise EvalError(f"VBench results {str(path)!r}: {key} is {data[key]!r}; allowed: a number or null")
    missing = data.get("missing", [])
    if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
        raise EvalError(f"VBench results {str(path)!r}: missing is {missing!r}; allowed: a list of dimension names")
    return data


def check_fidelity(data: dict[str, Any], path: str) -> dict[str, Any]:
    """eval/fidelity.py's fidelity_summary.json, its fields of the types it writes (else an error naming one)."""
    where = f"fidelity summary {path!r}"
    summary = data.get("summary")
    if not isinstance(summary, dict) or not all(isinstance(s, dict) for s in summary.values()):
        raise EvalError(
            f"{where}: summary is {type(summary).__name__}; allowed: an object of per-method objects "
            "(eval/fidelity.py's fidelity_summary.json)"
        )
    for method, fields in summary.items():
        for key in ("psnr_mean", "ssim_mean", "lpips_mean"):
            if not _score(fields.get(key)):
                raise EvalError(f"{where}: summary.{method}.{key} is {fields[key]!r}; allowed: a number or null")
    kinds = (("lpips", dict, "an object"), ("excluded", list, "a list"), ("reference", str, "a folder path"))
    for key, kind, allowed in kinds:
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise EvalError(f"{where}: {key} is {type(data[key]).__name__}; allowed: {allowed}")
    if not isinstance(data.get("lpips", {}).get("available", True), bool):
        raise EvalError(f"{where}: lpips.available is {data['lpips']['available']!r}; allowed: true or false")
    return data


def _float(value: Any) -> float | None:
    if value == "inf":  # eval/common.atomic_write_json's spelling of infinity
        return float("inf")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def paired_records(
    reference_name: str, folders: dict[str, Path], exclude_mismatched: bool = False
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[Mismatch]]:
    """{method: {name: record}} (the reference included) over the videos that pair with the reference's, and the
    pairs left out. A pair whose records differ on eval.common.PAIR_FIELDS, or a video without its record, is an
    error (its costs are another video's), or left out with `exclude_mismatched`. File hashes are not read here:
    eval/fidelity.py, which decodes every video anyway, checks them."""
    scans = {name: scan_folder(folder) for name, folder in folders.items()}
    reference = scans[reference_name]
    if not reference.records:
        raise EvalError(f"reference folder {str(folders[reference_name])!r} holds no complete video")
    others = {name: scan for name, scan in scans.items() if name != reference_name}
    mismatches = find_mismatches(reference, others, sorted(reference.videos), digest=False)
    settle_mismatches(mismatches, exclude_mismatched)
    records = {}
    for name, scan in scans.items():
        skip = excluded_names(mismatches, name)
        records[name] = {n: r for n, r in scan.records.items() if n not in skip}
    return records, mismatches


def build_rows(
    reference_name: str,
    folders: dict[str, Path],
    vbench: dict[str, dict[str, Any]],
    fidelity: dict[str, Any] | None,
    exclude_mismatched: bool = False,
) -> tuple[list[list[str]], list[str]]:
    """Table rows (reference first) and the notes to print under the table."""
    records, mismatches = paired_records(reference_name, folders, exclude_mismatched)
    reference = records[reference_name]
    notes = [f"excluded as mismatched ({EXCLUDE_FLAG}): {m.describe()}" for m in mismatches]
    fid_summary = (fidelity or {}).get("summary", {})
    rows = []
    for name, recs in records.items():
        costs = compare_costs(reference, recs)
        if name != reference_name and costs["common"] < len(reference):
            notes.append(f"{name}: {costs['common']} of the reference's {len(reference)} videos (costs over those)")
        scores = vbench.get(name, {})
        if scores and scores.get("missing"):
            notes.append(f"{name}: VBench dimensions missing: {', '.join(scores['missing'])}")
        fid = fid_summary.get(name, {})
        peak, cache = costs["peak_memory_bytes_mean"], costs["cache_bytes_mean"]
        rows.append(
            [
                name,
                str(costs["common"]),
                fmt(costs["latency_s_mean"], ".2f"),
                fmt(costs["latency_speedup"], ".2f"),
                fmt(costs["dit_tflops_mean"], ".4g"),
                fmt(costs["flops_speedup"], ".2f"),
                fmt(None if peak is None else peak / 2**30, ".2f"),
                fmt(None if cache is None else cache / 2**20, ".1f"),
                fmt(_float(scores.get("total")), ".2f"),
                fmt(_float(scores.get("quality")), ".2f"),
                fmt(_float(scores.get("semantic")), ".2f"),
                "(reference)" if name == reference_name else fmt(_float(fid.get("psnr_mean")), ".2f"),
                "" if name == reference_name else fmt(_float(fid.get("ssim_mean")), ".4f"),
                "" if name == reference_name else fmt(_float(fid.get("lpips_mean")), ".4f"),
            ]
        )
    if fidelity is not None:
        lp = fidelity.get("lpips", {})
        if not lp.get("available", True):
            notes.append(f"LPIPS unavailable: {lp.get('reason')}")
        if fidelity.get("excluded"):
            notes.append(
                f"fidelity left out {len(fidelity['excluded'])} mismatched pair(s) ({EXCLUDE_FLAG}; "
                "listed under 'excluded' in its summary)"
            )
        ref_path = fidelity.get("reference")
        if ref_path and Path(ref_path).resolve() != folders[reference_name].resolve():
            notes.append(f"fidelity was measured against {ref_path}, not {folders[reference_name]}")
    return rows, notes


def report(rows: list[list[str]], notes: list[str]) -> str:
    text = markdown_table(HEADERS, rows)
    text += "\nLatency and TFLOPs: means per video from the records; speed-ups: summed reference cost / summed cost.\n"
    text += "".join(f"- {note}\n" for note in notes)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eval/report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, help="folder of the uncached videos (NAME.mp4 + NAME.json)")
    p.add_argument("--reference-name", default="none", help="its name in the table (default: none)")
    p.add_argument("--methods", required=True, help="NAME=DIR[,NAME=DIR...]: each method's video folder")
    p.add_argument("--vbench", help="NAME=PATH[,...]: scaled_results.json (or its folder) per method")
    p.add_argument("--fidelity", help="fidelity_summary.json from eval/fidelity.py")
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument(
        EXCLUDE_FLAG,
        action="store_true",
        help="leave out (and list) the videos whose records do not pair with the reference's (other "
        "prompt, seed, size, frames or fps, or no record); without it they are an error",
    )
    args = p.parse_args(argv)
    try:
        if not args.reference_name.strip():
            raise EvalError(f"--reference-name {args.reference_name!r}: allowed: a non-empty name")
        if args.out is not None:
            check_output_file(args.out, "--out")  # before the folders are read, not after
        methods = parse_named_paths(args.methods, "--methods")
        if args.reference_name in methods:
            raise EvalError(f"--methods: {args.reference_name!r} is the reference's name (--reference-name)")
        folders = {args.reference_name: Path(args.reference), **methods}
        vbench = {}
        for name, path in (parse_named_paths(args.vbench, "--vbench") if args.vbench is not None else {}).items():
            if name not in folders:
                raise EvalError(f"--vbench: {name!r} is not a method; allowed: {', '.join(folders)}")
            vbench[name] = load_vbench(path)
        fidelity = None
        if args.fidelity is not None:
            fidelity = check_fidelity(load_json(Path(args.fidelity), "fidelity summary"), args.fidelity)
        text = report(*build_rows(args.reference_name, folders, vbench, fidelity, args.exclude_mismatched))
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out is not None:
        atomic_write_text(args.out, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
