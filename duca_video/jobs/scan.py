"""A job's bookkeeping around the models: which videos are already done, which must be refused, which another
job holds, and the one summary of the whole job.

- Scan (before any model loads): complete videos are skipped, broken ones redone, videos whose record shows
  other settings refused with the differing fields (or regenerated with `overwrite`).
- Claim (per batch): the writer locks each video (`jobs.locks`) and checks it again, since another
  job may have finished it since the scan; under sequence parallelism it tells its group what to generate.
- Summary: one for the whole job, counted on disk, printed by global rank 0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from duca_video.configs import InferenceConfig
from duca_video.configs.preflight import InputError
from duca_video.parallel.group_work import broadcast_from_writer
from duca_video.parallel.launch import ParallelContext

from .identity import VideoIdentity
from .locks import VideoLock
from .plan import VideoJob
from .records import OutputPaths, RunSummary
from .resume import check_output

__all__ = ["claim_batch", "finish_summary", "scan_outputs"]

log = logging.getLogger(__name__)

_MAX_LISTED = 10


def _agree(flags: list[bool], ctx: ParallelContext, device: torch.device) -> list[bool]:
    """The writer's flags on every rank of its video group (the ranks must generate the same batches)."""
    if ctx.group_size == 1 or not flags:
        return flags
    tensor = torch.tensor(flags, dtype=torch.uint8, device=device)
    return [bool(v) for v in broadcast_from_writer(tensor, ctx).tolist()]


def _check_no_folder_in_the_way(cfg: InferenceConfig, save_dir: Path, planned: list[VideoJob]) -> None:
    """A folder (or anything but a file) where a video, its record or its latent goes could never be replaced:
    named before any work."""
    for job in planned:
        out = OutputPaths(save_dir, job.name)
        for path in (out.video, out.record, *([out.latent] if cfg.save_latents else [])):
            if path.exists() and not path.is_file():
                kind = "a folder" if path.is_dir() else "not a regular file"
                raise InputError(
                    f"{path} is {kind}, where {job.name}'s output file goes: move it away, or use another --save-dir"
                )


def scan_outputs(
    cfg: InferenceConfig,
    save_dir: Path,
    planned: list[VideoJob],
    mine: list[VideoJob],
    identity: VideoIdentity,
    summary: RunSummary,
    ctx: ParallelContext,
    device: torch.device,
) -> list[VideoJob]:
    """The videos of this group's share still to generate. Refuses (InputError) when any video of the whole
    job has a record with other settings, unless cfg.overwrite; every rank checks the same, so all refuse."""
    _check_no_folder_in_the_way(cfg, save_dir, planned)
    differs = []
    for job in planned:  # records only (cheap): the same verdict on every rank
        status = check_output(OutputPaths(save_dir, job.name), identity(job), cfg.save_latents, hashes=False)
        if status.state == "differs":
            differs.append(f"{job.name} ({', '.join(status.detail)})")
    if differs and not cfg.overwrite:
        listed = "; ".join(differs[:_MAX_LISTED]) + (
            f"; and {len(differs) - _MAX_LISTED} more" if len(differs) > _MAX_LISTED else ""
        )
        raise InputError(
            f"{len(differs)} video(s) in {save_dir} were made with other settings: {listed}. "
            "Pass --overwrite to regenerate them, or use another --save-dir"
        )
    unique, seen = [], set()
    for job in mine:  # the first of each name, in order
        if job.name not in seen:
            seen.add(job.name)
            unique.append(job)
    flags = []
    for job in unique:
        status = check_output(OutputPaths(save_dir, job.name), identity(job), cfg.save_latents)
        if status.complete:
            summary.skipped.append(job.name)
        elif status.state == "broken":
            log.warning("%s: %s; generating it again", job.name, "; ".join(status.detail))
        flags.append(not status.complete)
    flags = _agree(flags, ctx, device)
    return [job for job, todo in zip(unique, flags) if todo]


def claim_batch(
    cfg: InferenceConfig,
    save_dir: Path,
    batch: list[VideoJob],
    identity: VideoIdentity,
    summary: RunSummary,
    ctx: ParallelContext,
    device: torch.device,
) -> tuple[list[VideoJob], list[VideoLock]]:
    """Lock the batch's videos (writer only) and keep those still to do; returns (jobs, held locks). A stop while
    claiming (SIGTERM, Ctrl-C) releases every lock taken so far."""
    flags: list[bool] = []
    locks: list[VideoLock] = []
    try:
        for job in batch:
            flags.append(_claim(cfg, save_dir, job, identity, summary, ctx, locks))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    flags = _agree(flags, ctx, device)
    return [job for job, keep in zip(batch, flags) if keep], locks


def _claim(
    cfg: InferenceConfig,
    save_dir: Path,
    job: VideoJob,
    identity: VideoIdentity,
    summary: RunSummary,
    ctx: ParallelContext,
    locks: list[VideoLock],
) -> bool:
    """Whether `job` is this group's to make; its lock joins `locks` as soon as it is taken."""
    if not ctx.is_writer:
        return True
    lock = VideoLock(save_dir, job.name)
    locks.append(lock)
    if not lock.acquire():
        locks.remove(lock)
        summary.busy.append((job.name, lock.describe_holder()))
        return False
    out = OutputPaths(save_dir, job.name)
    status = check_output(out, identity(job), cfg.save_latents)  # another job may have written it meanwhile
    if status.complete or (status.state == "differs" and not cfg.overwrite):
        locks.remove(lock)
        lock.release()
        if status.complete:
            summary.skipped.append(job.name)
        else:
            summary.failed.append(
                (job.name, "another job wrote it meanwhile with other settings: " + ", ".join(status.detail))
            )
        return False
    out.record.unlink(missing_ok=True)  # the record marks a finished video: none while it is redone
    return True


def finish_summary(
    cfg: InferenceConfig,
    save_dir: Path,
    planned: list[VideoJob],
    identity: VideoIdentity,
    summary: RunSummary,
    ctx: ParallelContext,
) -> RunSummary:
    """The whole job's counts: every group's summary merged on global rank 0 (unless interrupted, when the
    other groups may be gone), and how many of the job's videos are complete on disk now."""
    summary.job_total = len({job.name for job in planned})
    if ctx.world_size > 1 and not summary.interrupted:
        parts: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(parts, summary.to_parts() if ctx.is_writer else None)
        summary.merge([p for p in parts if p is not None])
    summary.writer = ctx.rank == 0
    if summary.writer:
        names = {job.name: job for job in planned}
        summary.job_complete = sum(
            check_output(OutputPaths(save_dir, name), identity(job), cfg.save_latents, hashes=False).complete
            for name, job in names.items()
        )
    return summary
