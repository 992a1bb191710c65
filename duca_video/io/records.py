"""Run records: where each video's files go, whether they are complete, and the end-of-run summary."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RECORD_FIELDS", "OutputPaths", "RunSummary"]

log = logging.getLogger(__name__)

# Keys every NAME.json holds (DESIGN.md contract 4, plus what is needed to read them).
RECORD_FIELDS = (
    "name", "prompt", "prompt_index", "sample_index", "text", "seed", "method", "method_config", "steps",
    "cfg_scale", "resolution", "aspect_ratio", "image_size", "video_size", "frames", "fps", "save_fps",
    "latent_shape", "dtype", "device", "batch_size", "latency_s", "batch_latency_s", "latency_scope",
    "dit_tflops", "dit_tflops_counted_by", "peak_memory_bytes", "peak_memory_kind", "cache_bytes",
    "world_size", "rank", "sp_size", "dp_size", "weights", "sampler", "video_codec", "files", "created",
    "versions",
)  # fmt: skip


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

    def complete(self, with_latent: bool) -> bool:
        """mp4 + json present (json is written last, so it marks a finished video), and the latent if asked."""
        done = self.video.is_file() and self.record.is_file()
        return done and (not with_latent or self.latent.is_file())

    def differs(self, expected: dict[str, Any]) -> list[str]:
        """Keys of `expected` whose value in the existing record is different (unreadable record: all keys)."""
        try:
            old = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return sorted(expected)
        return sorted(k for k, v in expected.items() if old.get(k) != v)


@dataclass
class RunSummary:
    save_dir: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # per written video, seconds
    tflops: list[float] = field(default_factory=list)  # per written video whose FLOPs were counted
    interrupted: bool = False
    writer: bool = True  # False on the ranks of a sequence-parallel group that help but do not write files

    @property
    def exit_code(self) -> int:
        """0: every video is there; 1: some failed; 130: stopped by the user or a signal."""
        if self.interrupted:
            return 130
        return 1 if self.failed else 0

    def format(self) -> str:
        total = len(self.written) + len(self.skipped) + len(self.failed)
        lines = [
            f"summary: {len(self.written)} written, {len(self.skipped)} skipped (already complete), "
            f"{len(self.failed)} failed, of {total} video(s) in {self.save_dir}"
            + (" (interrupted)" if self.interrupted else "")
        ]
        if self.latencies:
            lines.append(f"mean latency: {_mean(self.latencies):.3f} s per video")
        if self.tflops:
            lines.append(f"DiT: {_mean(self.tflops):.4f} TFLOPs per video")
        for name, error in self.failed:
            lines.append(f"FAILED {name}: {error}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "save_dir": self.save_dir,
            "written": len(self.written),
            "skipped": len(self.skipped),
            "failed": [{"name": n, "error": e} for n, e in self.failed],
            "mean_latency_s": _mean(self.latencies) if self.latencies else None,
            "mean_dit_tflops": _mean(self.tflops) if self.tflops else None,
            "interrupted": self.interrupted,
        }


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)
