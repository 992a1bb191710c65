"""Peak memory of a batch: CUDA max allocated, or on the CPU the resident-set peak of the process."""

from __future__ import annotations

from pathlib import Path

import torch


class PeakMemory:
    """Peak memory from construction on: CUDA max allocated, or on the CPU the resident-set peak above the
    resident set at the start (`kind` says which)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
            torch.cuda.reset_peak_memory_stats(device)
            return
        self.kind, self._start = "process_peak_rss_growth", _proc_status("VmRSS")
        try:  # Linux: "5" resets VmHWM (the peak RSS) to the current RSS, so the peak seen is this batch's own
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            # Without the reset only growth of the lifetime peak is visible (0 if an earlier batch went higher).
            self.kind, self._start = "process_max_rss_growth", _max_rss()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "process_peak_rss_growth":
            return max(0, _proc_status("VmHWM") - self._start)
        return max(0, _max_rss() - self._start)


def _proc_status(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _max_rss()


def _max_rss() -> int:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB
