"""Per-sample cache storage with byte accounting.

One `CacheState` lives for one sample (a batch of prompts denoised together, both CFG rows included) and is
reset when the next sample starts, so nothing leaks from one prompt into the next. Tensors are kept in the
model dtype, exactly as the blocks produce them; `live_bytes` / `peak_bytes` count everything held.
"""

from __future__ import annotations

from typing import Any

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


class _Copier:
    """Host <-> device copies for `OffloadedState`. On CUDA: pinned host memory and one side stream, so a copy
    neither blocks the host nor waits behind the compute queue, and hides under the running block; in-order on
    that one stream, so a store's copy to the host and a later prefetch of it cannot overtake each other.
    Elsewhere (CPU runs: "the device" is host memory too) plain copies, kept apart from the host's values. On the
    meta device (a FLOP or memory count) the "host" is the meta device too: copies have shapes and no values."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.host = device if device.type == "meta" else torch.device("cpu")

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.stream is None or tensor.device.type != "cuda":
            return tensor.detach().to(self.host, copy=True)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the value is computed
        with torch.cuda.stream(self.stream):
            host.copy_(tensor.detach(), non_blocking=True)
        tensor.record_stream(self.stream)  # its memory is not reused before the copy has read it
        return host

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """A device copy of `host` and the event to wait for before reading it (None: ready now)."""
        if self.stream is None:
            return (host.clone() if self.device == self.host else host.to(self.device)), None
        with torch.cuda.stream(self.stream):
            out = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        out.record_stream(torch.cuda.current_stream(self.device))  # freed while the compute stream may read it
        return out, ready


class OffloadedState(CacheState):
    """The cache in host memory: a block's tensors are brought to the device while the block before it runs
    (`prefetch`) and released when the block is done, so the device holds about two blocks' cache at a time
    (the running one and the next, plus the small stack tensors, which stay), at any video length. Host memory
    is the source of truth: every store goes to it (the engine stores again after any in-place change).

    On CUDA the host copies are pinned and every copy runs on one side stream (`_Copier`): no copy blocks the
    host, and a prefetch overlaps the previous block's compute. `reads` counts reads served by a prefetch and
    reads that had to fetch on demand (kept across samples). `live_bytes` / `peak_bytes` count the host-held
    cache (what `cache_bytes` reports); `resident_bytes` / `resident_peak_bytes` what the device holds.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self._copier: _Copier | None = None
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        self._pending: dict[tuple[int, str], Any] = {}  # (block, name) -> copy event not yet waited for
        self.resident_bytes = 0
        self.resident_peak_bytes = 0
        self.reads = {"prefetched": 0, "on_demand": 0}
        self.on_demand_blocks: set[int] = set()  # blocks whose reads were not prefetched (the first, normally)

    @property
    def copier(self) -> _Copier:
        if self._copier is None:
            self._copier = _Copier(self.device or torch.device("cpu"))
        return self._copier

    def _hold(self, block: int, name: str, tensor: torch.Tensor) -> None:
        slot = self._resident.setdefault(block, {})
        self.resident_bytes += _nbytes(tensor) - _nbytes(slot.get(name))
        slot[name] = tensor
        self.resident_peak_bytes = max(self.resident_peak_bytes, self.resident_bytes)

    def _fetch(self, block: int, name: str, host: torch.Tensor) -> torch.Tensor:
        device, ready = self.copier.to_device(host)
        self._hold(block, name, device)
        if ready is not None:
            self._pending[(block, name)] = ready
        return device

    def get(self, block: int, name: str) -> torch.Tensor | None:
        if block == STACK:
            return super().get(block, name)
        held = self._resident.get(block, {}).get(name)
        if held is not None:
            self.reads["prefetched"] += 1
        else:
            host = super().get(block, name)
            if host is None:
                return None
            self.reads["on_demand"] += 1
            self.on_demand_blocks.add(block)
            held = self._fetch(block, name, host)
        ready = self._pending.pop((block, name), None)
        if ready is not None:  # the compute stream waits for the copy; the host does not
            torch.cuda.current_stream(self.device).wait_event(ready)
        return held

    def put(self, block: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if block == STACK:
            return super().put(block, name, tensor)
        if self.device is None:
            self.device = tensor.device
        super().put(block, name, self.copier.to_host(tensor))
        if block in self._resident:  # the block is running (or prefetched): later reads in it see this value
            self._pending.pop((block, name), None)
            self._hold(block, name, tensor)
        return tensor

    def drop(self, block: int, name: str) -> None:
        super().drop(block, name)
        slot = self._resident.get(block, {})
        self._pending.pop((block, name), None)
        if name in slot:
            self.resident_bytes -= _nbytes(slot.pop(name))

    def enter(self, block: int) -> None:
        """`block` starts running: its reads and stores are held on the device until `release`."""
        self._resident.setdefault(block, {})

    def prefetch(self, block: int) -> None:
        """Start copying `block`'s cache to the device now (the running block's compute hides the copy)."""
        slot = self._resident.setdefault(block, {})
        for name, host in self._store.get(block, {}).items():
            if name not in slot:
                self._fetch(block, name, host)

    def release(self, block: int) -> None:
        """`block` is done: free its device copies (the host has every value)."""
        for name, tensor in self._resident.pop(block, {}).items():
            self._pending.pop((block, name), None)
            self.resident_bytes -= _nbytes(tensor)

    def release_all(self) -> None:
        """A step starts: nothing is running, and a prefetch that a skipped block never read is dropped."""
        for block in list(self._resident):
            self.release(block)

    def reset(self) -> None:
        super().reset()
        self._resident.clear()
        self._pending.clear()
        self.resident_bytes = 0
        self.resident_peak_bytes = 0
