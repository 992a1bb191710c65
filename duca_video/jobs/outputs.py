"""Writing a generated video: its latent, its mp4 and its record last, each atomically, so a record on disk means
a whole video; a failure removes what the video had written, a full disk stops the job."""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from duca_video import __version__
from duca_video.configs import InferenceConfig
from duca_video.io import is_storage_full, save_latent, write_video
from duca_video.io.files import atomic_write_json, file_digest

from .identity import VideoIdentity
from .plan import VideoJob
from .records import OutputPaths, RunSummary
from .resume import canonical

if TYPE_CHECKING:  # the pipeline's models and results (it imports this module)
    from duca_video.pipeline import Generated, Models

__all__ = ["make_record", "write_batch_video", "write_outputs"]

log = logging.getLogger(__name__)


def make_record(
    cfg: InferenceConfig, m: Models, job: VideoJob, g: Generated, n: int, identity: dict[str, Any]
) -> dict[str, Any]:
    """The run record of one video; `RECORD_FIELDS` lists its keys. `identity` is every setting that changes the
    pixels: resume compares it (see `jobs.resume`)."""
    t, h, w, _ = g.frames[0].shape
    return {
        "name": job.name,
        "prompt": job.prompt,
        "prompt_index": job.index,
        "sample_index": job.k,
        "text": job.text,
        "seed": job.seed,
        "method": cfg.cache.method,
        "method_config": m.method_config,
        "steps": m.sampler.num_sampling_steps,
        "cfg_scale": m.sampler.cfg_scale,
        "resolution": cfg.resolution if cfg.image_size is None else f"{cfg.size[0]}x{cfg.size[1]}",
        "aspect_ratio": cfg.aspect_ratio if cfg.image_size is None else None,
        "image_size": list(cfg.size),
        "video_size": [h, w],
        "frames": t,
        "fps": cfg.fps,
        "save_fps": cfg.video_fps,
        "latent_shape": list(m.latent_shape),
        "dtype": str(m.dtype).removeprefix("torch."),
        "device": str(m.device),
        "batch_size": n,
        "latency_s": g.batch_latency_s / n,
        "batch_latency_s": g.batch_latency_s,
        "latency_scope": "text encoding + sampling + VAE decode of the batch, divided by its videos",
        "dit_tflops": None if g.dit_flops is None else g.dit_flops / n / 1e12,
        "dit_tflops_counted_by": m.flops_counted_by if g.dit_flops is not None else "not counted (--no-count-flops)",
        "peak_memory_bytes": g.peak_memory_bytes,
        "peak_memory_kind": g.peak_memory_kind,
        "cache_bytes": g.cache_bytes,
        "cache_offload": cfg.cache.offload,
        "compile": cfg.compile,
        "world_size": m.ctx.world_size,
        "rank": m.ctx.rank,
        "sp_size": m.ctx.sp_size,
        "cfg_size": m.ctx.cfg_size,
        "dp_size": m.ctx.dp_size,
        "weights": m.weights,
        "sampler": dataclasses.asdict(m.sampler),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"duca_video": __version__, "torch": torch.__version__},
        "identity": canonical(identity),
    }


def write_outputs(
    cfg: InferenceConfig, out: OutputPaths, frames: torch.Tensor, latent: torch.Tensor, record: dict[str, Any]
) -> None:
    """Latent, then video, then the record last: a record on disk means the video is complete, and the sizes and
    hashes in it tell a whole file from a truncated or replaced one."""
    files, written = {"video": out.video.name}, []
    try:  # each file appears whole (atomic writes); a failure removes this video's files written before it
        if cfg.save_latents:
            save_latent(out.latent, latent, metadata={"prompt": record["prompt"], "seed": str(record["seed"])})
            written.append(out.latent)
            files["latent"] = out.latent.name
            digest = file_digest(out.latent)
            record["latent_bytes"], record["latent_sha256"] = digest["bytes"], digest["sha256"]
        record["video_codec"] = write_video(out.video, frames, cfg.video_fps)
        written.append(out.video)
        digest = file_digest(out.video)
        record["video_bytes"], record["video_sha256"] = digest["bytes"], digest["sha256"]
        record["files"] = files
        atomic_write_json(out.record, record)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def write_batch_video(
    cfg: InferenceConfig,
    m: Models,
    save_dir: Path,
    job: VideoJob,
    g: Generated,
    i: int,
    batch: int,
    identity: VideoIdentity,
    summary: RunSummary,
) -> None:
    """Video `i` of the generated batch: its files and record, or the reason in the summary. A full disk stops
    the job (raised); any other failure is this video's alone."""
    if not bool(torch.isfinite(g.latents[i]).all()):  # e.g. a fp16 overflow: never write a black video
        log.error("%s: the final latent is not finite (NaN or inf); nothing written", job.name)
        summary.failed.append((job.name, "the final latent is not finite (NaN or inf); nothing written"))
        return
    record = make_record(cfg, m, job, g, batch, identity(job))
    try:
        write_outputs(cfg, OutputPaths(save_dir, job.name), g.frames[i], g.latents[i], record)
    except OSError as exc:  # nothing half-written is left (atomic writes)
        if is_storage_full(exc):
            raise
        log.error("writing %s failed: %s", job.name, exc)
        summary.failed.append((job.name, f"{type(exc).__name__}: {exc}"))
        return
    except Exception as exc:  # noqa: BLE001 - not the disk: report it with its traceback
        log.exception("writing %s failed", job.name)
        summary.failed.append((job.name, f"{type(exc).__name__}: {exc}"))
        return
    summary.written.append(job.name)
    summary.latencies.append(record["latency_s"])
    tflops = record["dit_tflops"]
    if tflops is not None:
        summary.tflops.append(tflops)
    log.info(
        "wrote %s.mp4 (%.2f s, %s)",
        job.name,
        record["latency_s"],
        "FLOPs not counted" if tflops is None else f"{tflops:.4g} DiT TFLOPs",
    )
