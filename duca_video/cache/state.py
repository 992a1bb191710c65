"""Per-sample cache storage with byte accounting.

One `CacheState` lives for one sample (a batch of prompts denoised together, both CFG rows included) and is
reset when the next sample starts, so nothing leaks from one prompt into the next. Tensors are kept in the
model dtype, exactly as the blocks produce them; `live_bytes` / `peak_bytes` count everything held.
"""

from __future__ import annotations

import torch

STACK = -1  # pseudo block index for the output (or residual) of the whole block stack


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class CacheState:
    def __init__(self) -> None:
        self._store: dict[int, dict[str, torch.Tensor]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def get(self, block: int, name: str) -> torch.Tensor | None:
        return self._store.get(block, {}).get(name)

    def has(self, block: int, name: str) -> bool:
        return name in self._store.get(block, {})

    def put(self, block: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        slot = self._store.setdefault(block, {})
        self.live_bytes += _nbytes(tensor) - _nbytes(slot.get(name))
        slot[name] = tensor
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return tensor

    def drop(self, block: int, name: str) -> None:
        slot = self._store.get(block, {})
        if name in slot:
            self.live_bytes -= _nbytes(slot.pop(name))

    def names(self, block: int) -> list[str]:
        return list(self._store.get(block, {}))

    def reset(self) -> None:
        self._store.clear()
        self.live_bytes = 0
        self.peak_bytes = 0

    def bytes_by_name(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for slot in self._store.values():
            for name, t in slot.items():
                out[name] = out.get(name, 0) + _nbytes(t)
        return out
