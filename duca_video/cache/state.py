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


class OffloadedState(CacheState):
    """The cache in host memory: a block's tensors are brought to the device when the block reads them and
    released when it is done, so the device holds about one block's cache at a time (plus the small stack
    tensors, which stay), at any video length. Host memory is the source of truth: every store goes to it (the
    engine stores again after any in-place change), a read copies to the device.

    `live_bytes` / `peak_bytes` count the host-held cache (what `cache_bytes` reports); `resident_bytes` /
    `resident_peak_bytes` what the device holds. Copies are synchronous: prefetching the next block on a side
    stream from pinned memory (so the copy hides under compute) is the planned next step, to be measured on a GPU.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        self.resident_bytes = 0
        self.resident_peak_bytes = 0

    def _host(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_meta:  # FLOP / memory counting on meta: nothing moves
            return tensor
        return tensor.detach().to("cpu", copy=True)

    def _hold(self, block: int, name: str, tensor: torch.Tensor) -> None:
        slot = self._resident.setdefault(block, {})
        self.resident_bytes += _nbytes(tensor) - _nbytes(slot.get(name))
        slot[name] = tensor
        self.resident_peak_bytes = max(self.resident_peak_bytes, self.resident_bytes)

    def get(self, block: int, name: str) -> torch.Tensor | None:
        if block == STACK:
            return super().get(block, name)
        held = self._resident.get(block, {}).get(name)
        if held is not None:
            return held
        host = super().get(block, name)
        if host is None:
            return None
        device = host if self.device is None or host.is_meta else host.to(self.device)
        if device is host and not host.is_meta:
            device = host.clone()  # on a CPU run "the device" is host memory too: keep the two apart
        self._hold(block, name, device)
        return device

    def put(self, block: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if block == STACK:
            return super().put(block, name, tensor)
        if self.device is None and not tensor.is_meta:
            self.device = tensor.device
        super().put(block, name, self._host(tensor))
        if block in self._resident:  # the block is running: later reads in it see this value
            self._hold(block, name, tensor)
        return tensor

    def drop(self, block: int, name: str) -> None:
        super().drop(block, name)
        slot = self._resident.get(block, {})
        if name in slot:
            self.resident_bytes -= _nbytes(slot.pop(name))

    def enter(self, block: int) -> None:
        """`block` starts running: its reads and stores are held on the device until `release`."""
        self._resident.setdefault(block, {})

    def release(self, block: int) -> None:
        """`block` is done: free its device copies (the host has every value)."""
        for tensor in self._resident.pop(block, {}).values():
            self.resident_bytes -= _nbytes(tensor)

    def reset(self) -> None:
        super().reset()
        self._resident.clear()
        self.resident_bytes = 0
        self.resident_peak_bytes = 0
