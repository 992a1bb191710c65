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
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False, sharex=True)
    colors = plt.get_cmap("tab20")
    families = list(dict.fromkeys(_family(p["method"]) for p in points))  # one colour per method, in order
    for ax, (key, label) in zip(axes[0], panels):
        identical, shown = [], set()
        for p in points:
            x, y = p.get("speedup"), p.get(key)
            if x is None or y is None:
                continue
            if not math.isfinite(y):  # identical results: PSNR has no finite place on the axis
                identical.append(p["method"])
                continue
            family = _family(p["method"])
            solved = family == "auto"  # schedules solved for a budget: black stars, the points to compare against
            color = "black" if solved else colors(families.index(family) % 20)
            label = None if family in shown else family
            ax.scatter(
                [x],
                [y],
                color=color,
                label=label,
                zorder=4 if solved else 3,
                marker="*" if solved else "o",
                s=90 if solved else None,
            )
            shown.add(family)
            if settings := _settings(p["method"]):  # the variant's settings next to its point
                ax.annotate(settings, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6, color=color)
        if identical:
            ax.text(0.02, 0.02, f"identical (inf): {', '.join(identical)}", transform=ax.transAxes, fontsize=7)
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
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


def _family(variant: str) -> str:
    return variant.partition("[")[0]


def _settings(variant: str) -> str:
    """`magcache[ratios_path=weights/tiny/magcache.json;max_skips=1]` -> `ratios=tiny/magcache.json;max_skips=1`."""
    inside = variant.partition("[")[2].rstrip("]")
    parts = []
    for item in filter(None, inside.split(";")):
        key, _, value = item.partition("=")
        if key == "calibration":  # auto's calibration file: one per model, named in the figure's caption
            continue
        if "/" in value:  # a file: its name says enough
            key, value = key.removesuffix("_path"), "/".join(Path(value).parts[-2:])
        parts.append(f"{key}={value}")
    return ";".join(parts)
