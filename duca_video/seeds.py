"""Seeds as the Python API takes them: None, one int, or one int per video; checked where they enter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit values; Open-Sora's CLI seeds are int64 too


def _is_seed(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEED


def check_seed(seed: Any, where: str) -> int | tuple[int, ...] | None:
    """`seed` as given if it is None, a seed, or a non-empty list/tuple of seeds (one per video); else a clear
    error naming `where` and what is allowed."""
    if seed is None or _is_seed(seed):
        return seed
    if isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)) and seed and all(map(_is_seed, seed)):
        return tuple(seed)
    raise ValueError(
        f"{where}: seed={seed!r} is not allowed; allowed: None, an int in 0..2**63-1, or a non-empty "
        "list of such ints (one per video)"
    )
