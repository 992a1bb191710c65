"""Analytic prompt-adherence metrics for testbed clips: what colour, shape, size and motion a clip shows.

A clip is read without any learned model: the background is the clip's median colour, the foreground is the
pixels far from it (a soft mask), the colour is the nearest palette colour to the mask-weighted mean, and the
direction is the sign of the dominant slope of a straight line fitted to the mask's centroid over all frames.
Ground-truth clips from `data.py` read back exactly (100%); captions shuffled across clips score at chance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .data import DataConfig
from .grammar import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS

__all__ = [
    "CHANCE",
    "ClipReading",
    "adherence",
    "color_accuracy",
    "direction_accuracy",
    "parse_caption",
    "read_clips",
    "temporal_consistency",
]

# Foreground weight ramps from 0 to 1 between these distances (RGB in [0, 1]) from the background; every
# palette colour is >= 0.72 away from both backgrounds, so a pixel more than ~70% covered counts fully.
FG_LO, FG_HI = 0.2, 0.5
MIN_SPEED = 0.3  # px per frame: slower centroid drift reads as "not moving"
CHANCE = {"colour": 1 / len(COLOURS), "direction": 1 / len(DIRECTIONS), "shape": 1 / len(SHAPES)}

_CATEGORIES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "direction": tuple(DIRECTIONS),
    "background": tuple(BACKGROUNDS),
    "size": SIZES,
    "speed": SPEEDS,
}
_REQUIRED = ("colour", "shape", "direction", "background")


def parse_caption(caption: str) -> dict[str, str | None]:
    """Attributes named by a caption: colour, shape, direction, background (required), size, speed (or None).

    Raises ValueError when a required attribute is missing or a category is named twice with different words.
    """
    words = re.findall(r"[a-z]+", caption.lower())
    out: dict[str, str | None] = {}
    for category, values in _CATEGORIES.items():
        found = sorted({w for w in words if w in values})
        if len(found) > 1:
            raise ValueError(f"caption {caption!r} names several {category}s: {found}")
        out[category] = found[0] if found else None
    missing = [c for c in _REQUIRED if out[c] is None]
    if missing:
        raise ValueError(f"caption {caption!r} names no {', '.join(missing)}")
    return out


@dataclass
class ClipReading:
    """What one clip shows. Attributes are None when the clip has no readable shape (or it does not move)."""

    background: str
    colour: str | None
    shape: str | None
    size: str | None
    direction: str | None
    velocity: tuple[float, float]  # fitted centroid motion (px per frame), y downwards
    consistency: float  # mean soft IoU of consecutive foreground masks after aligning their centroids
    track: torch.Tensor  # (T, 2) centroid (x, y) per frame, NaN where the frame has no foreground


def _foreground(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rgb in [0, 1] (B, T, H, W, 3), background (B, 3), soft mask (B, T, H, W), distance (B, T, H, W))."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, T, H, W) in [-1, 1], got {tuple(video.shape)}")
    rgb = ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
    # The shape covers well under half of the pixels, so the per-channel median is the background.
    background = rgb.flatten(1, 3).median(dim=1).values
    dist = (rgb - background[:, None, None, None]).norm(dim=-1)
    return rgb, background, ((dist - FG_LO) / (FG_HI - FG_LO)).clamp(0, 1), dist


def _shift(mask: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Translate (N, H, W) masks by (dx, dy) pixels (bilinear, zeros outside)."""
    n, h, w = mask.shape
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * 2 / h - 1
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * 2 / w - 1
    gx = xs[None, None, :].expand(n, h, w) - (dx * 2 / w)[:, None, None]
    gy = ys[None, :, None].expand(n, h, w) - (dy * 2 / h)[:, None, None]
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(mask[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def _soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = torch.minimum(a, b).flatten(1).sum(1)
    union = torch.maximum(a, b).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp_min(1e-6), torch.zeros_like(union))


def _templates(cx: torch.Tensor, cy: torch.Tensor, area: torch.Tensor, h: int, w: int) -> dict[str, torch.Tensor]:
    """Disc and square of the given area centred on (cx, cy), rendered as `data.render` does."""
    dx = torch.arange(w, dtype=torch.float32)[None, None, :] + 0.5 - cx[:, None, None]
    dy = torch.arange(h, dtype=torch.float32)[None, :, None] + 0.5 - cy[:, None, None]
    r_disc = (area / torch.pi).sqrt()[:, None, None]
    r_box = (area.sqrt() / 2)[:, None, None]
    disc = (r_disc + 0.5 - (dx.square() + dy.square()).sqrt()).clamp(0, 1)
    box = (r_box + 0.5 - dx.abs()).clamp(0, 1) * (r_box + 0.5 - dy.abs()).clamp(0, 1)
    return {"circle": disc, "square": box}


def _size_split(config: DataConfig) -> float:
    """Equivalent radius (px) halfway between the "small" and "large" ranges."""
    return (config.radius["small"][1] + config.radius["large"][0]) / 2


def read_clips(video: torch.Tensor, config: DataConfig | None = None) -> list[ClipReading]:
    """Read every clip of a (B, 3, T, H, W) batch in [-1, 1]; `config` (default DataConfig()) sets the size
    classes."""
    size_split = _size_split(config or DataConfig())
    rgb, background, fg, dist = _foreground(video)
    b, t, h, w = fg.shape
    # Colour from the mask's core (weight^2) so anti-aliased edges, half background, barely count.
    core = fg.square()[..., None]
    mean_rgb = (rgb * core).sum((1, 2, 3)) / core.sum((1, 2, 3)).clamp_min(1e-6)
    palette = torch.tensor(list(COLOURS.values()))
    colour_idx = torch.cdist(mean_rgb, palette).argmin(1)

    # Pixel coverage: a pixel mixes shape and background linearly, so its share of the shape colour is its
    # distance from the background over the shape's. Faint deviations (noise, < FG_LO) count as background.
    contrast = (mean_rgb - background).norm(dim=-1).clamp_min(FG_HI)[:, None, None, None]
    cover = torch.where(dist >= FG_LO, (dist / contrast).clamp(0, 1), torch.zeros_like(dist))
    mass = cover.flatten(2).sum(-1)  # (B, T)
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    cx = (cover.sum(2) * xs).sum(-1) / mass.clamp_min(1e-6)
    cy = (cover.sum(3) * ys).sum(-1) / mass.clamp_min(1e-6)
    valid = mass >= 1.0  # at least a pixel's worth of foreground

    # Shape and size: compare each frame's mask with a disc and a square of the same area and centroid.
    templ = _templates(cx.flatten(), cy.flatten(), mass.flatten(), h, w)
    flat = cover.reshape(b * t, h, w)
    iou = {k: _soft_iou(flat, v).view(b, t) for k, v in templ.items()}

    # Consistency: consecutive masks should match once their centroids are aligned.
    if t > 1:
        step_x, step_y = (cx[:, 1:] - cx[:, :-1]).flatten(), (cy[:, 1:] - cy[:, :-1]).flatten()
        shifted = _shift(cover[:, :-1].reshape(-1, h, w), step_x, step_y)
        pair_iou = _soft_iou(shifted, cover[:, 1:].reshape(-1, h, w)).view(b, t - 1)
        pair_ok = (valid[:, 1:] & valid[:, :-1]).float()
        consistency = (pair_iou * pair_ok).sum(1) / (t - 1)  # frames without a shape count as 0
    else:
        consistency = valid[:, 0].float()

    readings = []
    frames = torch.arange(t, dtype=torch.float32)
    for i in range(b):
        ok = valid[i]
        bg_name = "dark" if float(background[i].mean()) < 0.5 else "light"
        track = torch.stack([cx[i], cy[i]], -1).masked_fill(~ok[:, None], float("nan"))
        if int(ok.sum()) < max(2, (t + 1) // 2):
            readings.append(ClipReading(bg_name, None, None, None, None, (0.0, 0.0), float(consistency[i]), track))
            continue
        f = frames[ok] - frames[ok].mean()
        vx = float((f * (cx[i][ok] - cx[i][ok].mean())).sum() / f.square().sum())
        vy = float((f * (cy[i][ok] - cy[i][ok].mean())).sum() / f.square().sum())
        direction = None
        if max(abs(vx), abs(vy)) >= MIN_SPEED:
            direction = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
        shape = max(SHAPES, key=lambda s: float(iou[s][i][ok].mean()))
        area = float(mass[i][ok].mean())
        radius = (area / torch.pi) ** 0.5 if shape == "circle" else area**0.5 / 2
        size = "small" if radius < size_split else "large"
        colour = list(COLOURS)[int(colour_idx[i])]
        readings.append(ClipReading(bg_name, colour, shape, size, direction, (vx, vy), float(consistency[i]), track))
    return readings


def _accuracy(readings: list[ClipReading], captions: list[str], key: str) -> float:
    if len(readings) != len(captions):
        raise ValueError(f"{len(readings)} clips but {len(captions)} captions")
    hits = [getattr(r, key) == parse_caption(c)[key] for r, c in zip(readings, captions)]
    return sum(hits) / max(1, len(hits))


def color_accuracy(video: torch.Tensor, captions: list[str]) -> float:
    """Fraction of clips whose shape has the caption's colour (chance 1/6)."""
    return _accuracy(read_clips(video), captions, "colour")


def direction_accuracy(video: torch.Tensor, captions: list[str]) -> float:
    """Fraction of clips whose shape's centroid track moves the caption's way (chance 1/4)."""
    return _accuracy(read_clips(video), captions, "direction")


def temporal_consistency(video: torch.Tensor) -> float:
    """Mean soft IoU of consecutive foreground masks after aligning centroids, in [0, 1] (ground truth ~0.9)."""
    return sum(r.consistency for r in read_clips(video)) / max(1, video.shape[0])


def adherence(video: torch.Tensor, captions: list[str], config: DataConfig | None = None) -> dict[str, Any]:
    """All metrics at once: per-attribute accuracies, `all_correct` (colour, direction, shape and background
    all right), `consistency`, and `n`. Size is scored only for captions that name a size."""
    readings = read_clips(video, config)
    parsed = [parse_caption(c) for c in captions]
    if len(readings) != len(parsed):
        raise ValueError(f"{len(readings)} clips but {len(captions)} captions")
    out: dict[str, Any] = {"n": len(readings)}
    for key in ("colour", "direction", "shape", "background"):
        out[key] = sum(getattr(r, key) == p[key] for r, p in zip(readings, parsed)) / max(1, len(parsed))
    sized = [(r, p) for r, p in zip(readings, parsed) if p["size"] is not None]
    out["size"] = sum(r.size == p["size"] for r, p in sized) / len(sized) if sized else None
    out["all_correct"] = sum(
        all(getattr(r, k) == p[k] for k in ("colour", "direction", "shape", "background"))
        for r, p in zip(readings, parsed)
    ) / max(1, len(parsed))
    out["consistency"] = sum(r.consistency for r in readings) / max(1, len(readings))
    return out
