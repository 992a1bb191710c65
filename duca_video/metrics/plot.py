"""Speed-up against fidelity, one point per method (the plot every comparison of caching methods wants)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def speedup_fidelity_plot(
    points: list[dict[str, Any]], path: Path, xlabel: str, panels: list[tuple[str, str]]
) -> str | None:
    """`points`: {"method", "speedup", <panel keys>...}; one panel per (key, y label). Writes a PNG (temp file,
    then renamed); returns why no plot was written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on evaluation machines
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharex=True)
    colors = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        identical = []
        for i, p in enumerate(points):
            x, y = p.get("speedup"), p.get(key)
            if x is None or y is None:
                continue
            if not math.isfinite(y):  # identical results: PSNR has no finite place on the axis
                identical.append(p["method"])
                continue
            ax.scatter([x], [y], color=colors(i % 10))
            ax.annotate(p["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if identical:
            ax.text(0.02, 0.02, f"identical (inf): {', '.join(identical)}", transform=ax.transAxes, fontsize=7)
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=150)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return None
