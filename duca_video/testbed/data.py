"""Procedural text-to-video clips whose content can be checked analytically.

Each clip is one shape (circle or square) of one colour moving in a straight line (left, right, up or down) at
constant speed over a uniform dark or light background, captioned by the grammar of `grammar.py`, e.g.
"a large red square moving left on a dark background". Everything is drawn from a seed, rendered in a batch
with torch (anti-aliased, a few ms for hundreds of clips), and the whole track stays inside the frame so the
metrics of `adherence.py` see the full shape in every frame.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .grammar import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS, make_caption

__all__ = ["Clip", "DataConfig", "SyntheticVideos", "render"]


@dataclass
class DataConfig:
    """Video size and the ranges attributes are drawn from. Radii and speeds are in pixels (per frame)."""

    num_frames: int = 8
    height: int = 16
    width: int = 16
    fps: int = 8
    radius: dict[str, tuple[float, float]] = field(default_factory=lambda: {"small": (1.75, 2.25), "large": (2.5, 3.0)})
    speed: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"slowly": (0.6, 0.65), "quickly": (0.65, 0.7)}
    )
    # "centre": every track starts within `start_jitter` px of the frame centre and heads for the edge the
    # caption names, so the direction word also says which half of the frame the shape is in, a cue a small
    # model picks up as early as colour (see scripts/train_tiny.py). "anywhere": any start that keeps the
    # whole track inside the frame.
    start: str = "centre"
    start_jitter: float = 1.0
    caption_size: bool = True  # write "small"/"large" in the caption
    caption_speed: bool = False  # write "slowly"/"quickly" in the caption

    def __post_init__(self) -> None:
        self.radius = {k: tuple(float(x) for x in v) for k, v in self.radius.items()}
        self.speed = {k: tuple(float(x) for x in v) for k, v in self.speed.items()}
        if set(self.radius) != set(SIZES) or set(self.speed) != set(SPEEDS):
            raise ValueError(f"radius keys must be {SIZES} and speed keys {SPEEDS}")
        if min(self.num_frames, self.height, self.width) < 2:
            raise ValueError("num_frames, height and width must be >= 2")
        if self.start not in ("centre", "anywhere"):
            raise ValueError(f"start must be 'centre' or 'anywhere', got {self.start!r}")
        if self.start_jitter < 0:
            raise ValueError(f"start_jitter must be >= 0, got {self.start_jitter}")
        r_max = max(hi for _, hi in self.radius.values())
        travel = max(hi for _, hi in self.speed.values()) * (self.num_frames - 1)
        # From the centre the track has half the frame (one radius of margin); from anywhere, all of it (two).
        if self.start == "centre":
            needed, room = r_max + travel, min(self.height, self.width) / 2
        else:
            needed, room = 2 * r_max + travel, min(self.height, self.width)
        if needed > room:
            raise ValueError(
                f"a shape of radius {r_max} moving {travel:.2f} px does not fit in {self.height}x{self.width}: "
                "shrink the radius or the speed, or use fewer frames"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["radius"] = {k: list(v) for k, v in self.radius.items()}
        d["speed"] = {k: list(v) for k, v in self.speed.items()}
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DataConfig keys {unknown}")
        return cls(**values)


@dataclass
class Clip:
    """One clip's attributes; `start` is the shape centre in frame 0 (x, y) in pixels, `speed` px per frame."""

    colour: str
    shape: str
    direction: str
    background: str
    size: str
    speed_word: str
    radius: float
    speed: float
    start: tuple[float, float]

    def caption(self, config: DataConfig) -> str:
        return make_caption(
            self.colour,
            self.shape,
            self.direction,
            self.background,
            self.size if config.caption_size else None,
            self.speed_word if config.caption_speed else None,
        )


def render(clips: list[Clip], config: DataConfig, device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, 3, T, H, W) float32 in [-1, 1]. Pixel coverage is exact for squares and a 1-px ramp for circles."""
    T, H, W = config.num_frames, config.height, config.width

    def col(values: list[Any]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    fg = col([COLOURS[c.colour] for c in clips])[:, :, None, None, None] * 2 - 1  # (B, 3, 1, 1, 1)
    bg = col([BACKGROUNDS[c.background] for c in clips])[:, :, None, None, None] * 2 - 1
    radius = col([c.radius for c in clips])[:, None, None, None]  # (B, 1, 1, 1) over (T, H, W)
    square = col([c.shape == "square" for c in clips])[:, None, None, None]
    step = col([[DIRECTIONS[c.direction][0] * c.speed, DIRECTIONS[c.direction][1] * c.speed] for c in clips])
    start = col([c.start for c in clips])
    t = torch.arange(T, dtype=torch.float32, device=device)
    cx = (start[:, 0:1] + step[:, 0:1] * t)[:, :, None, None]  # (B, T, 1, 1)
    cy = (start[:, 1:2] + step[:, 1:2] * t)[:, :, None, None]
    # Pixel (i, j) covers [j, j+1] x [i, i+1]; its centre is at (j + 0.5, i + 0.5).
    dx = torch.arange(W, dtype=torch.float32, device=device)[None, None, None, :] + 0.5 - cx
    dy = torch.arange(H, dtype=torch.float32, device=device)[None, None, :, None] + 0.5 - cy
    box = (radius + 0.5 - dx.abs()).clamp(0, 1) * (radius + 0.5 - dy.abs()).clamp(0, 1)
    disc = (radius + 0.5 - (dx.square() + dy.square()).sqrt()).clamp(0, 1)
    cover = (square * box + (1 - square) * disc)[:, None]  # (B, 1, T, H, W)
    return bg + cover * (fg - bg)


def _start(step: int, extent: int, radius: float, travel: float, frac: float, jitter: float | None) -> float:
    """Start coordinate: along the motion it leaves room for the whole travel; across it, anywhere inside.
    With `jitter`, it is also within `jitter` px of the centre."""
    lo, hi = radius, extent - radius
    if step > 0:
        hi -= travel
    elif step < 0:
        lo += travel
    if jitter is not None:  # DataConfig checked that the centre itself leaves room for the track
        lo, hi = max(lo, extent / 2 - jitter), min(hi, extent / 2 + jitter)
    return lo + (hi - lo) * frac


class SyntheticVideos:
    """Seeded source of (video, caption) batches: `batch(n, generator)` or `sample(n, seed)`."""

    def __init__(self, config: DataConfig | None = None) -> None:
        self.config = config or DataConfig()

    def draw(self, n: int, generator: torch.Generator) -> list[Clip]:
        """n random clips; the start is drawn so that the whole track stays inside the frame."""
        cfg = self.config
        colours, directions, backgrounds = list(COLOURS), list(DIRECTIONS), list(BACKGROUNDS)
        u = torch.rand(n, 6, generator=generator, dtype=torch.float64).tolist()
        idx = torch.stack(
            [
                torch.randint(k, (n,), generator=generator)
                for k in (len(colours), len(SHAPES), len(directions), len(backgrounds), len(SIZES), len(SPEEDS))
            ],
            1,
        ).tolist()
        clips = []
        for (ci, si, di, bi, zi, vi), (ur, uv, ua, ub, _, _) in zip(idx, u):
            size, speed_word = SIZES[zi], SPEEDS[vi]
            r_lo, r_hi = cfg.radius[size]
            v_lo, v_hi = cfg.speed[speed_word]
            radius, speed = r_lo + (r_hi - r_lo) * ur, v_lo + (v_hi - v_lo) * uv
            direction = directions[di]
            ddx, ddy = DIRECTIONS[direction]
            travel = speed * (cfg.num_frames - 1)
            jitter = cfg.start_jitter if cfg.start == "centre" else None
            start = (
                _start(ddx, cfg.width, radius, travel, ua, jitter),
                _start(ddy, cfg.height, radius, travel, ub, jitter),
            )
            clips.append(
                Clip(colours[ci], SHAPES[si], direction, backgrounds[bi], size, speed_word, radius, speed, start)
            )
        return clips

    def batch(
        self, n: int, generator: torch.Generator, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, list[str], list[Clip]]:
        """(videos (n, 3, T, H, W) in [-1, 1], captions, clips)."""
        clips = self.draw(n, generator)
        return render(clips, self.config, device), [c.caption(self.config) for c in clips], clips

    def sample(
        self, n: int, seed: int, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, list[str], list[Clip]]:
        """`batch` with a fresh generator seeded `seed`: the same seed gives the same clips."""
        return self.batch(n, torch.Generator().manual_seed(seed), device)
