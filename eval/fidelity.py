"""Fidelity of each method's videos to the uncached videos of the same name, and what each method saves.

    python eval/fidelity.py --reference samples/vbench/none --methods duca=samples/vbench/duca,toca=... --out DIR

For every video NAME.mp4 (with its NAME.json record) present in the reference folder and in a method's folder:
PSNR (one MSE over the whole video, 8-bit range), SSIM (mean over frames and RGB planes) and LPIPS (mean over
frames; only when the `lpips` package and its backbone weights are available locally, otherwise null with the
reason). Speed-ups come from the records: summed reference latency_s (dit_tflops) over the method's, over the
videos both have.

A name is a pair only when both records agree on prompt, text, seed, image_size, video_size, frames and fps, and
each video is the file its record describes (its name; its size and sha256 where the record holds them). Anything
else (a video without its record included) is an error naming the video, the field and both values; with
--exclude-mismatched those pairs are left out, listed on stderr, in the markdown and under "excluded" in the
JSON, and the rest are scored. Writes into --out:
  fidelity_per_video.csv   one row per (method, video)
  fidelity_summary.csv     one row per method: mean and median of each metric, speed-ups
  fidelity_summary.json    the same, plus the LPIPS status (eval/report.py reads it)
  fidelity_summary.md      the summary as a markdown table
  fidelity_speedup.png     speed-up against fidelity, one point per method (needs matplotlib)
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import `eval.` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from eval.common import (
    EXCLUDE_FLAG,
    PAIR_FIELDS,
    EvalError,
    FolderScan,
    Mismatch,
    atomic_write_json,
    atomic_write_text,
    check_output_folder,
    compare_costs,
    excluded_names,
    find_mismatches,
    fmt,
    markdown_table,
    mean,
    median,
    parse_named_paths,
    scan_folder,
    settle_mismatches,
)

log = logging.getLogger("eval.fidelity")

METRICS = ("psnr", "ssim", "lpips")
PER_VIDEO_FIELDS = (
    "method",
    "name",
    "psnr",
    "ssim",
    "lpips",
    "latency_s",
    "reference_latency_s",
    "dit_tflops",
    "reference_dit_tflops",
)
SUMMARY_FIELDS = (
    "method",
    "pairs",
    "missing",
    "excluded",
    "identical",
    "psnr_mean",
    "psnr_median",
    "ssim_mean",
    "ssim_median",
    "lpips_mean",
    "lpips_median",
    "latency_s_mean",
    "reference_latency_s_mean",
    "latency_speedup",
    "dit_tflops_mean",
    "reference_dit_tflops_mean",
    "flops_speedup",
)


def _pair_up(
    reference: Path, methods: dict[str, Path], limit: int | None, exclude_mismatched: bool
) -> tuple[FolderScan, dict[str, FolderScan], list[str], list[Mismatch]]:
    """The folders read, the reference names to compare and the pairs left out; an error when a pair does not
    compare the same video (unless excluded) or when a method has nothing left to compare."""
    ref = scan_folder(reference)
    if not ref.records:
        raise EvalError(f"reference folder {str(reference)!r} holds no complete video (NAME.mp4 with NAME.json)")
    scans = {}
    for method, folder in methods.items():
        scans[method] = scan_folder(folder)
        if not scans[method].videos & ref.videos:
            raise EvalError(f"method {method!r}: {str(folder)!r} has no video named as one in the reference folder")
    names = sorted(ref.videos)[:limit]
    mismatches = find_mismatches(ref, scans, names)
    settle_mismatches(mismatches, exclude_mismatched)
    for method, scan in scans.items():
        if not {n for n in names if n in scan.videos} - excluded_names(mismatches, method):
            raise EvalError(
                f"method {method!r}: every video it shares with the reference was excluded as "
                f"mismatched ({EXCLUDE_FLAG}); nothing is left to compare"
            )
    return ref, scans, names, mismatches


def _summary(
    method: str, got: list[dict[str, Any]], ref: FolderScan, scan: FolderScan, names: list[str], skip: set[str]
) -> dict[str, Any]:
    """One method's means, medians and speed-ups over its compared pairs; pairs + missing + excluded = names."""
    excluded = len({n for n in names if n in scan.videos} & skip)
    costs = compare_costs(
        {n: ref.records[n] for n in names if n in ref.records}, {r["name"]: scan.records[r["name"]] for r in got}
    )
    summary: dict[str, Any] = {
        "method": method,
        "pairs": len(got),
        "missing": len(names) - len(got) - excluded,
        "excluded": excluded,
        "identical": sum(r["psnr"] == math.inf for r in got),
    }
    for metric in METRICS:
        summary[f"{metric}_mean"] = mean(r[metric] for r in got)
        summary[f"{metric}_median"] = median(r[metric] for r in got)
    summary.update({k: costs[k] for k in SUMMARY_FIELDS if k in costs})
    return summary


def compare(
    reference: Path,
    methods: dict[str, Path],
    lpips_net: str | None = "alex",
    device: str = "cpu",
    limit: int | None = None,
    exclude_mismatched: bool = False,
) -> dict[str, Any]:
    """Per-video rows and per-method summaries (see the module docstring). Pairs whose records differ on
    PAIR_FIELDS, or whose files are not their records', are an error, or left out and listed when
    `exclude_mismatched`."""
    from duca_video.metrics.fidelity import load_lpips, video_fidelity
    from duca_video.metrics.video import read_video

    ref, scans, names, mismatches = _pair_up(reference, methods, limit, exclude_mismatched)
    skip = {method: excluded_names(mismatches, method) for method in methods}
    lpips_model, lpips_reason = (None, "disabled (--lpips off)") if lpips_net is None else load_lpips(lpips_net, device)
    if lpips_reason:
        log.warning("LPIPS unavailable: %s", lpips_reason)

    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for i, name in enumerate(names):
        ref_video = None  # decoded once per name, for all methods
        for method, folder in methods.items():
            rec = scans[method].records.get(name)
            if rec is None or name in skip[method]:
                continue
            try:  # an unreadable file or a size mismatch ends the run, naming the video
                ref_video = read_video(reference / f"{name}.mp4") if ref_video is None else ref_video
                other = read_video(folder / f"{name}.mp4")
                scores = video_fidelity(ref_video, other, lpips_model)
            except ValueError as exc:
                raise EvalError(f"method {method!r}, video {name!r}: {exc}") from None
            except RuntimeError as exc:  # LPIPS on frames too small for its backbone, or out of memory
                if lpips_model is None:
                    raise
                log.warning("LPIPS failed on %s (%s); reporting no LPIPS for any video", name, exc)
                lpips_model, lpips_reason = None, f"failed on {name!r}: {type(exc).__name__}: {exc}"
                for done in (r for method_rows in rows.values() for r in method_rows):
                    done["lpips"] = None  # all or nothing: a mean over some videos would mislead
                scores = video_fidelity(ref_video, other, None)
            ref_rec = ref.records[name]
            rows[method].append(
                {
                    "method": method,
                    "name": name,
                    **scores,
                    "latency_s": rec.get("latency_s"),
                    "reference_latency_s": ref_rec.get("latency_s"),
                    "dit_tflops": rec.get("dit_tflops"),
                    "reference_dit_tflops": ref_rec.get("dit_tflops"),
                }
            )
        log.info("[%d/%d] %s", i + 1, len(names), name)

    summaries = {m: _summary(m, rows[m], ref, scans[m], names, skip[m]) for m in methods}
    return {
        "reference": str(reference),
        "methods": {m: str(p) for m, p in methods.items()},
        "lpips": {"net": lpips_net, "available": lpips_model is not None, "reason": lpips_reason},
        "psnr": "one MSE over all pixels of the video, data range 255; inf when identical",
        "speedup": "sum of the reference's latency_s (dit_tflops) / sum of the method's, over the videos both have",
        "pairing": f"same name, and records equal on {', '.join(PAIR_FIELDS)}; mismatched pairs "
        + ("excluded (listed under 'excluded')" if exclude_mismatched else "are an error"),
        "excluded": [m.to_dict() for m in mismatches],
        "summary": summaries,
        "per_video": [r for m in methods for r in rows[m]],
    }


# ---------------------------------------------------------------------------------------------------- outputs
def _csv(rows: list[dict[str, Any]], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    return buf.getvalue()


def summary_markdown(result: dict[str, Any]) -> str:
    headers = [
        "method",
        "videos",
        "excluded",
        "PSNR mean",
        "PSNR median",
        "SSIM mean",
        "SSIM median",
        "LPIPS mean",
        "latency speed-up",
        "FLOPs speed-up",
    ]
    rows = [
        [
            s["method"],
            str(s["pairs"]),
            str(s["excluded"]),
            fmt(s["psnr_mean"], ".2f"),
            fmt(s["psnr_median"], ".2f"),
            fmt(s["ssim_mean"], ".4f"),
            fmt(s["ssim_median"], ".4f"),
            fmt(s["lpips_mean"], ".4f"),
            fmt(s["latency_speedup"], ".2f"),
            fmt(s["flops_speedup"], ".2f"),
        ]
        for s in result["summary"].values()
    ]
    text = markdown_table(headers, rows)
    if not result["lpips"]["available"]:
        text += f"\nLPIPS unavailable: {result['lpips']['reason']}\n"
    if result["excluded"]:  # said next to the numbers: they are over fewer videos than the folders hold
        text += f"\nExcluded as mismatched ({EXCLUDE_FLAG}):\n"
        text += "".join(
            f"- {Mismatch(m['method'], m['name'], tuple(m['problems'])).describe()}\n" for m in result["excluded"]
        )
    return text


def plot(result: dict[str, Any], path: Path, speedup: str = "latency") -> str | None:
    """Speed-up (x) against mean PSNR / SSIM / LPIPS (one panel each; LPIPS only when measured). Returns why no
    plot was written, or None."""
    from duca_video.metrics.plot import speedup_fidelity_plot

    labels = {
        "psnr": "PSNR (dB), higher is better",
        "ssim": "SSIM, higher is better",
        "lpips": "LPIPS, lower is better",
    }
    panels = [(m, labels[m]) for m in METRICS if any(s[f"{m}_mean"] is not None for s in result["summary"].values())]
    points = [
        {"method": s["method"], "speedup": s[f"{speedup}_speedup"], **{m: s[f"{m}_mean"] for m, _ in panels}}
        for s in result["summary"].values()
    ]
    xlabel = f"{'latency' if speedup == 'latency' else 'DiT FLOPs'} speed-up vs reference (x)"
    return speedup_fidelity_plot(points, path, xlabel, panels)


def write_outputs(result: dict[str, Any], out: Path, speedup: str = "latency") -> tuple[dict[str, Path], str | None]:
    """The files listed in the module docstring; returns their paths and why the plot was skipped (or None)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        name: out / f"fidelity_{name}"
        for name in ("per_video.csv", "summary.csv", "summary.json", "summary.md", "speedup.png")
    }
    atomic_write_text(paths["per_video.csv"], _csv(result["per_video"], PER_VIDEO_FIELDS))
    atomic_write_text(paths["summary.csv"], _csv(list(result["summary"].values()), SUMMARY_FIELDS))
    atomic_write_text(paths["summary.md"], summary_markdown(result))
    why_not = plot(result, paths["speedup.png"], speedup)
    result = {**result, "plot": None if why_not else str(paths["speedup.png"]), "plot_skipped": why_not}
    atomic_write_json(paths["summary.json"], result)
    if why_not:
        del paths["speedup.png"]
    return paths, why_not


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/fidelity.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, help="folder of the uncached videos (NAME.mp4 + NAME.json)")
    p.add_argument("--methods", required=True, help="NAME=DIR[,NAME=DIR...]: each method's video folder")
    p.add_argument("--out", required=True, help="folder for the CSV, JSON, markdown and PNG outputs")
    p.add_argument("--lpips", default="alex", choices=["alex", "vgg", "squeeze", "off"], help="LPIPS backbone")
    p.add_argument("--device", default="cpu", help="device for LPIPS (cpu, cuda, cuda:N)")
    p.add_argument("--speedup", default="latency", choices=["latency", "flops"], help="x axis of the plot")
    p.add_argument("--limit", type=int, help="compare only the first N reference videos (by name)")
    p.add_argument(
        EXCLUDE_FLAG,
        action="store_true",
        help="leave out (and list) the pairs whose records differ on prompt, seed, size, frames or fps, "
        "or whose video has no record; without it they are an error",
    )
    return p


def _check_device(name: str, lpips: bool) -> None:
    """--device: a torch device name; CUDA must be present when LPIPS runs on it."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise EvalError(f"--device {name!r} is not allowed; allowed: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise EvalError(f"--device {name!r} is not allowed; allowed: cpu, cuda, cuda:N")
    if lpips and device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise EvalError(
            f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); allowed: "
            "cpu, or --lpips off"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        methods = parse_named_paths(args.methods, "--methods")
        if args.limit is not None and args.limit < 1:
            raise EvalError(f"--limit {args.limit}: must be >= 1")
        check_output_folder(args.out, "--out")  # before the videos are decoded, not after
        _check_device(args.device, args.lpips != "off")
        result = compare(
            Path(args.reference),
            methods,
            None if args.lpips == "off" else args.lpips,
            args.device,
            args.limit,
            args.exclude_mismatched,
        )
    except (EvalError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths, why_not = write_outputs(result, Path(args.out), args.speedup)
    print(summary_markdown(result), end="")
    for path in paths.values():
        print(f"wrote {path}")
    if why_not:
        print(f"no plot: {why_not}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
