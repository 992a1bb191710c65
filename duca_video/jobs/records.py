"""Run records: where each video's files go, whether they are complete, and the end-of-run summary."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RECORD_FIELDS", "OutputPaths", "RunSummary"]

log = logging.getLogger(__name__)

# Keys every NAME.json holds: the run record of docs/generating.md (what made the video, its cost, its identity
# for resuming, and the sizes and hashes of its files).
RECORD_FIELDS = (
    "name",
    "prompt",
    "prompt_index",
    "sample_index",
    "text",
    "seed",
    "method",
    "method_config",
    "steps",
    "cfg_scale",
    "resolution",
    "aspect_ratio",
    "image_size",
    "video_size",
    "frames",
    "fps",
    "save_fps",
    "latent_shape",
    "dtype",
    "device",
    "batch_size",
    "latency_s",
    "batch_latency_s",
    "latency_scope",
    "dit_tflops",
    "dit_tflops_counted_by",
    "peak_memory_bytes",
    "peak_memory_kind",
    "cache_bytes",
    "cache_offload",
    "compile",
    "world_size",
    "rank",
    "sp_size",
    "cfg_size",
    "dp_size",
    "weights",
    "sampler",
    "video_codec",
    "files",
    "created",
    "versions",
    "identity",
    "video_bytes",
    "video_sha256",
)


@dataclass(frozen=True)
class OutputPaths:
    folder: Path
    name: str

    @property
    def video(self) -> Path:
        return self.folder / f"{self.name}.mp4"

    @property
    def record(self) -> Path:
        return self.folder / f"{self.name}.json"

    @property
    def latent(self) -> Path:
        return self.folder / f"{self.name}.latent.safetensors"


@dataclass
class RunSummary:
    save_dir: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    busy: list[tuple[str, str]] = field(default_factory=list)  # left to another job holding the video's lock
    latencies: list[float] = field(default_factory=list)  # per written video, seconds
    tflops: list[float] = field(default_factory=list)  # per written video whose FLOPs were counted
    interrupted: bool = False
    writer: bool = True  # False on the ranks that do not print (all but global rank 0)
    job_total: int | None = None  # distinct videos of the whole job (every data-parallel share)
    job_complete: int | None = None  # of those, complete on disk when the job ended

    @property
    def exit_code(self) -> int:
        """0: every video is there; 1: some failed or are still with another job; 130: stopped by a signal."""
        if self.interrupted:
            return 130
        return 1 if self.failed or self.busy else 0

    def format(self) -> str:
        done = len(self.written) + len(self.skipped)
        lines = [
            f"summary: {len(self.written)} written, {len(self.skipped)} skipped (already complete), "
            f"{len(self.failed)} failed"
            + (f", {len(self.busy)} left to another job" if self.busy else "")
            + f" in {self.save_dir}"
            + (" (interrupted)" if self.interrupted else "")
        ]
        if self.job_total is not None:
            complete = done if self.job_complete is None else self.job_complete
            lines.append(f"job: {complete} of {self.job_total} video(s) complete on disk")
        if self.latencies:
            lines.append(f"mean latency: {_mean(self.latencies):.3f} s per video")
        if self.tflops:
            lines.append(f"DiT: {_mean(self.tflops):.4f} TFLOPs per video")
        for name, error in self.failed:
            lines.append(f"FAILED {name}: {error}")
        for name, why in self.busy:
            lines.append(f"NOT DONE {name}: {why}")
        return "\n".join(lines)

    def to_parts(self) -> dict[str, Any]:
        """What another rank needs to merge this share into one summary."""
        return {
            "written": self.written,
            "skipped": self.skipped,
            "failed": self.failed,
            "busy": self.busy,
            "latencies": self.latencies,
            "tflops": self.tflops,
        }

    def merge(self, parts: list[dict[str, Any]]) -> None:
        """Replace the counts by the sum over every data-parallel share (this one's included in `parts`)."""
        for key in ("written", "skipped", "failed", "busy", "latencies", "tflops"):
            setattr(self, key, [item for part in parts for item in part[key]])
        self.failed = [tuple(f) for f in self.failed]
        self.busy = [tuple(b) for b in self.busy]

    def to_dict(self) -> dict[str, Any]:
        return {
            "save_dir": self.save_dir,
            "written": len(self.written),
            "skipped": len(self.skipped),
            "failed": [{"name": n, "error": e} for n, e in self.failed],
            "busy": [{"name": n, "holder": h} for n, h in self.busy],
            "job_total": self.job_total,
            "job_complete": self.job_complete,
            "mean_latency_s": _mean(self.latencies) if self.latencies else None,
            "mean_dit_tflops": _mean(self.tflops) if self.tflops else None,
            "interrupted": self.interrupted,
        }


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)
