"""Put reference latents into the starting noise and build the sampler's frame mask from per-video plans."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import MaskStrategyError
from .strategy import FramePlan

__all__ = ["condition_latents"]


def condition_latents(
    z: torch.Tensor, references: Sequence[Sequence[torch.Tensor]], plans: Sequence[FramePlan]
) -> tuple[torch.Tensor, torch.Tensor]:
    """z: (B, C, T, H, W) starting noise; references[b]: video b's reference latents, each (C, T_ref, H, W);
    plans[b]: its FramePlan (from `plan_frames`). Returns (a copy of z with the reference frames written in,
    frame_mask (B, T) float32 for `RFlowSampler.sample(frame_mask=...)`), as upstream's apply_mask_strategy
    (which writes into z in place; a copy keeps the caller's noise reusable)."""
    if z.dim() != 5:
        raise ValueError(f"z must be (B, C, T, H, W), got shape {tuple(z.shape)}")
    if len(plans) != z.shape[0] or len(references) != z.shape[0]:
        raise ValueError(
            f"need one plan and one reference list per video: z has {z.shape[0]}, got "
            f"{len(plans)} plans and {len(references)} reference lists"
        )
    out = z.clone()
    mask = torch.ones(z.shape[0], z.shape[2], dtype=torch.float32, device=z.device)
    for b, plan in enumerate(plans):
        if len(plan.mask) != z.shape[2]:
            raise ValueError(f"video {b}: its plan has {len(plan.mask)} frames, z has {z.shape[2]}")
        for place in plan.placements:
            ref = references[b][place.reference]
            if ref.dim() != 4 or ref.shape[0] != z.shape[1] or ref.shape[2:] != z.shape[3:]:
                raise MaskStrategyError(
                    f"video {b}: reference {place.reference} has latent shape {tuple(ref.shape)}; it must be "
                    f"(C, T, H, W) = ({z.shape[1]}, T, {z.shape[3]}, {z.shape[4]}) to match the video"
                )
            src = ref[:, place.reference_start : place.reference_start + place.length]
            out[b, :, place.target_start : place.target_start + place.length] = src.to(out.dtype)
        mask[b] = torch.tensor(plan.mask, dtype=torch.float32)
    return out, mask
