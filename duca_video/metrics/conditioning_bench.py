"""Cached-vs-uncached fidelity with an image-to-video condition, on the shipped tiny testbed model (CPU, seconds).

Every video starts from the same reference frame (a testbed clip's first frame, kept with mask strategy "0" as
Open-Sora's image-to-video) and the same noise; each method's videos are compared with the uncached ones
(PSNR / SSIM over the decoded clips, [-1, 1] pixels) and its kept frame with the reference (`kept_psnr`:
infinite when the frame is kept exactly, which the sampler guarantees for every method).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from .. import cache as cache_lib
from ..cache.variants import parse_variant
from ..conditioning import parse_mask_strategy, plan_frames
from ..conditioning.latents import condition_latents
from ..testbed.data import SyntheticVideos
from ..testbed.tiny import load_tiny
from .fidelity import psnr, ssim

__all__ = ["conditioning_fidelity"]


@torch.no_grad()
def conditioning_fidelity(
    methods: Sequence[str] = ("duca",),
    num_videos: int = 4,
    num_steps: int = 30,
    mask_strategy: str = "0",
    seed: int = 0,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """{"config": {...}, "methods": {NAME: {"psnr_vs_none", "ssim_vs_none", "kept_psnr"}}} for the tiny model,
    `num_videos` videos (testbed clips and captions drawn with `seed`, noise seeds seed..seed+n-1), each
    conditioned with `mask_strategy` on its clip's first frame. `overrides[method]` are that method's cache settings."""
    bed = load_tiny()
    sampler = bed.sampler
    sampler.num_sampling_steps = num_steps
    seeds = list(range(seed, seed + num_videos))
    # Testbed clips and their captions: each video animates its own clip's first frame, described by its caption.
    videos, prompts, _ = SyntheticVideos(bed.data).batch(num_videos, torch.Generator().manual_seed(seed))
    references = [[video[:, :1]] for video in videos]
    frames = bed.data.num_frames
    plan = plan_frames(parse_mask_strategy(mask_strategy), frames, [1])
    shape = (3, frames, bed.data.height, bed.data.width)
    noise = torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    z, frame_mask = condition_latents(noise, references, [plan] * num_videos)
    text = bed.text_encoder.encode(prompts)
    y_null = bed.model.y_embedder.y_embedding[None, None].expand_as(text["y"])

    def sample(settings: dict[str, Any] | None = None) -> torch.Tensor:
        run = dataclasses.replace(sampler, **settings) if settings else sampler  # a variant may set e.g. fewer steps
        kwargs = {"model_kwargs": bed.model_kwargs(num_videos), "frame_mask": frame_mask, "seed": seeds}
        out = run.sample(bed.model, z, text["y"], y_null, text["mask"], progress=False, **kwargs)
        return bed.vae.decode(out)

    baseline = sample()
    kept = [p.target_start for p in plan.placements]
    ref = torch.stack([r[0][:, 0] for r in references])
    results: dict[str, Any] = {}
    for method in methods:
        video = baseline if method == "none" else _cached_video(bed.model, method, overrides, sample)
        results[method] = {
            "psnr_vs_none": psnr(baseline, video, 2.0),
            "ssim_vs_none": ssim(baseline.transpose(1, 2), video.transpose(1, 2), 2.0),
            "kept_psnr": psnr(ref, video[:, :, kept[0]], 2.0) if kept else None,
        }
    config = {"model": "tiny testbed (weights/tiny)", "num_videos": num_videos, "num_steps": num_steps}
    config.update(mask_strategy=mask_strategy, seed=seed)
    return {"config": config, "methods": results}


def _cached_video(model: Any, method: str, overrides: dict[str, dict[str, Any]] | None, sample: Any) -> torch.Tensor:
    """The video `sample` makes with `method` (a name or a variant such as teacache[threshold=0.2]) enabled."""
    config = parse_variant(method)
    if overrides and method in overrides:
        config = cache_lib.make_config(config, **overrides[method])
    cache_lib.enable(model, config)
    try:
        return sample(config.sampler_settings())
    finally:
        cache_lib.disable(model)
