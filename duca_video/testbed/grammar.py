"""The caption grammar of the synthetic testbed: every attribute word, its meaning, and the vocabulary.

Kept apart from the renderer so that the text encoder and the metrics can use it without importing torch-heavy
rendering code, and so that one list defines what a caption can say.
"""

from __future__ import annotations

# RGB in [0, 1]. Saturated primaries/secondaries: each is >= 0.8 (in one channel at least) away from both
# backgrounds and from every other colour, so the nearest-colour rule of the metric cannot confuse them.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.1),
    "blue": (0.15, 0.2, 0.95),
    "yellow": (0.9, 0.85, 0.1),
    "magenta": (0.85, 0.1, 0.85),
    "cyan": (0.1, 0.85, 0.85),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {"dark": (0.08, 0.08, 0.08), "light": (0.92, 0.92, 0.92)}
SHAPES: tuple[str, ...] = ("circle", "square")
# Unit step per frame in (dx, dy) pixel coordinates (y grows downwards, as in images).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SIZES: tuple[str, ...] = ("small", "large")
SPEEDS: tuple[str, ...] = ("slowly", "quickly")
FILLER: tuple[str, ...] = ("a", "moving", "on", "background")
PAD, UNK = "<pad>", "<unk>"


def vocabulary() -> list[str]:
    """Every word the grammar can produce, after the two special tokens (<pad> = 0, <unk> = 1)."""
    words = [*FILLER, *COLOURS, *SHAPES, *DIRECTIONS, *BACKGROUNDS, *SIZES, *SPEEDS]
    return [PAD, UNK, *words]


def make_caption(
    colour: str, shape: str, direction: str, background: str, size: str | None = None, speed: str | None = None
) -> str:
    """The caption "a [size] {colour} {shape} moving {direction} [speed] on a {background} background"."""
    parts = ["a", *([size] if size else []), colour, shape, "moving", direction, *([speed] if speed else [])]
    return " ".join([*parts, "on", "a", background, "background"])
