"""Sampling one batch with reference frames and loops, as Open-Sora 1.2's inference does.

For every loop: each video's text for that loop, fresh noise (drawn from the video's own generator, so loop k's
noise follows loop k-1's whatever the batch), the reference latents written into it with the frame mask of the
video's plan, RFlow sampling, VAE decode. From loop 1 on, the previous clip is decoded, encoded again by the VAE
(as upstream's append_generated) and becomes one more reference, whose last --condition-frame-length latent
frames start the next clip. The output is clip 0 followed by every later clip without those leading frames.

A batch is sampled in at most two calls per loop: the videos with reference frames (with a frame mask) and the
others (without one), so a plain video gives the same result as in a plain batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from duca_video.io.media import read_media
from duca_video.models.text_encoder import null_caption

from .latents import condition_latents
from .setup import FrameGeometry, loop_groups
from .strategy import FramePlan, plan_frames

__all__ = ["ConditionedBatch", "encode_reference", "needs_conditioning", "sample_conditioned"]

log = logging.getLogger(__name__)


@dataclass
class ConditionedBatch:
    latents: torch.Tensor  # (B, C, T_out, H, W): the clips' latents joined like the video
    video: torch.Tensor | None  # (B, 3, T_out, H, W) pixels on the group's writer, None elsewhere
    # (videos, cache step kinds, text keys attended) per sampler call
    calls: list[tuple[int, list[str] | None, int]] = field(default_factory=list)
    cache_bytes: int = 0


def needs_conditioning(jobs: list[Any]) -> bool:
    """Whether the batch needs this module (else the pipeline's plain text-to-video path runs)."""
    return any(getattr(job, "condition", None) is not None for job in jobs)


def encode_reference(vae: Any, pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """(3, T, H, W) pixels -> (C, T', H', W') latent. Open-Sora's VAE samples its posterior: from a generator
    seeded with the video's seed, so the reference latent does not depend on the batch."""
    generator = torch.Generator(device=vae.device).manual_seed(seed)
    return vae.encode(pixels[None].to(device=vae.device, dtype=vae.dtype), generator=generator)[0]


def _plans(jobs: list[Any], refs: list[list[torch.Tensor]], loop: int, cfg: Any, frames: int) -> list[FramePlan]:
    plans = []
    for job, job_refs in zip(jobs, refs):
        groups = () if job.condition is None else loop_groups(job.condition, loop, cfg)
        lengths = [int(r.shape[1]) for r in job_refs]
        plans.append(plan_frames(groups, frames, lengths, loop, cfg.align, f"{job.name}: mask strategy"))
    return plans


def _row_groups(plans: list[FramePlan]) -> list[tuple[list[int], bool]]:
    masked = [b for b, plan in enumerate(plans) if plan.conditioned]
    plain = [b for b, plan in enumerate(plans) if not plan.conditioned]
    return [(rows, flag) for rows, flag in ((masked, True), (plain, False)) if rows]


def _user_references(m: Any, cfg: Any, jobs: list[Any]) -> list[list[torch.Tensor]]:
    pixels: dict[str, torch.Tensor] = {}  # read each file once per batch
    refs = []
    for job in jobs:
        paths = () if job.condition is None else job.condition.references
        for path in paths:
            if path not in pixels:
                pixels[path] = read_media(path, cfg.size)
        refs.append([encode_reference(m.vae, pixels[path], job.seed) for path in paths])
    return refs


@torch.no_grad()
def sample_conditioned(
    m: Any, cfg: Any, jobs: list[Any], model_kwargs: Callable[[int], dict[str, torch.Tensor]], progress: bool
) -> ConditionedBatch:
    """`m`: the pipeline's Models; `model_kwargs(n)`: the size / fps arguments for n videos."""
    n, frames = len(jobs), m.latent_shape[1]
    geo = FrameGeometry.of_vae(m.vae)
    keep = cfg.condition_frame_length if cfg.loop > 1 else 0
    drop_pixels = geo.pixels_of(keep) if keep else 0
    generators = [torch.Generator().manual_seed(job.seed) for job in jobs]
    refs = _user_references(m, cfg, jobs)
    y_null = null_caption(m.model, n).to(m.device)
    group = m.group
    out = ConditionedBatch(torch.empty(0), None)
    latent_parts: list[torch.Tensor] = []
    video_parts: list[torch.Tensor] = []
    for loop in range(cfg.loop):
        texts = [job.texts[loop] if job.texts else job.text for job in jobs]
        y, mask = group.encode(m.text_encoder, texts)
        noise = torch.stack([torch.randn(m.latent_shape, generator=g) for g in generators])
        plans = _plans(jobs, refs, loop, cfg, frames)
        z, frame_mask = condition_latents(noise.to(device=m.device, dtype=m.dtype), refs, plans)
        rows_out: dict[int, torch.Tensor] = {}
        for rows, masked in _row_groups(plans):
            result = group.sample(
                m.sampler,
                m.model,
                z[rows],
                y[rows],
                y_null[rows],
                mask[rows],
                model_kwargs=model_kwargs(len(rows)),
                frame_mask=frame_mask[rows] if masked else None,
                progress=progress,
                seed=[jobs[b].seed for b in rows],
            )
            kinds = None if m.controller is None else [h["kind"] for h in m.controller.history]
            out.calls.append((len(rows), kinds, m.sampler.last_text_tokens))
            out.cache_bytes = max(out.cache_bytes, int(m.controller.cache_bytes) if m.controller is not None else 0)
            rows_out.update({b: result[k] for k, b in enumerate(rows)})
        latents = torch.stack([rows_out[b] for b in range(n)])
        latents = group.gather(latents, m.model.config.patch_size)
        video = group.decode(m.vae, latents.to(m.dtype), cfg.num_frames)
        latent_parts.append(latents if loop == 0 else latents[:, :, keep:])
        if video is not None:
            video_parts.append(video if loop == 0 else video[:, :, drop_pixels:])
        if loop + 1 < cfg.loop:  # every rank needs the clip it conditions the next loop on
            clip = group.share(video)
            for b, job in enumerate(jobs):
                refs[b].append(encode_reference(m.vae, clip[b], job.seed))
    out.latents = torch.cat(latent_parts, dim=2)
    out.video = torch.cat(video_parts, dim=2) if video_parts else None
    return out
