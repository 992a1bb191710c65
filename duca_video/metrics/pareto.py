"""How far a variant is above the others' speed / fidelity front: for `auto`, the test of its claim.

For a variant at FLOPs speed-up s, the front it is measured against is every *other* variant (not another one
of the compared family) with a speed-up >= s, i.e. at equal or lower FLOPs: the best PSNR and SSIM among them.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["front_margins", "format_margins"]


def front_margins(results: dict[str, dict[str, Any]], family: str) -> list[dict[str, Any]]:
    """One row per variant of `family` (e.g. "auto"): its speed-up, PSNR, SSIM, and the best fixed variant's
    at equal or lower FLOPs (None when no fixed variant is that fast)."""
    mine = {k: v for k, v in results.items() if k.partition("[")[0] == family}
    fixed = {k: v for k, v in results.items() if k not in mine and k != "none"}
    rows = []
    for name, r in mine.items():
        faster = {k: v for k, v in fixed.items() if v["flops_speedup"] >= r["flops_speedup"] - 1e-9}
        best_psnr = max(faster.items(), key=lambda kv: kv[1]["psnr_vs_none"], default=(None, None))
        best_ssim = max((v["ssim_vs_none"] for v in faster.values()), default=None)
        rows.append(
            {
                "variant": name,
                "flops_speedup": r["flops_speedup"],
                "latency_speedup": r.get("latency_speedup"),
                "psnr": r["psnr_vs_none"],
                "ssim": r["ssim_vs_none"],
                "front_variant": best_psnr[0],
                "front_psnr": None if best_psnr[1] is None else best_psnr[1]["psnr_vs_none"],
                "front_ssim": best_ssim,
            }
        )
    return rows


def format_margins(rows: list[dict[str, Any]]) -> str:
    """A markdown table of `front_margins`."""
    lines = [
        "| variant | FLOPs speed-up | latency / FLOPs speed-up | PSNR | best fixed at >= its speed-up | its PSNR "
        "| margin | SSIM / fixed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r["latency_speedup"] is None else f"{100 * r['latency_speedup'] / r['flops_speedup']:.0f}%"
        if r["front_psnr"] is None:
            front, margin, ssim = "none that fast", "-", f"{r['ssim']:.4f} / -"
        else:
            front = _cell(r["front_variant"])
            margin = "inf" if math.isinf(r["psnr"]) else f"{r['psnr'] - r['front_psnr']:+.2f} dB"
            ssim = f"{r['ssim']:.4f} / {r['front_ssim']:.4f}"
        psnr_front = "-" if r["front_psnr"] is None else f"{r['front_psnr']:.2f}"
        lines.append(
            f"| {_cell(r['variant'])} | {r['flops_speedup']:.2f}x | {ratio} | {r['psnr']:.2f} | {front} | {psnr_front} "
            f"| {margin} | {ssim} |"
        )
    return "\n".join(lines)


def _cell(variant: str) -> str:
    """A variant name in a markdown table cell: its list settings' "|" escaped (a column bar otherwise)."""
    return variant.replace("|", "\\|")
