"""The sampler's argument checks: every shape named, before the loop starts (a wrong one would fail mid-loop,
or worse, broadcast silently)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch


def check_sample_inputs(
    z: torch.Tensor,
    y: torch.Tensor,
    y_null: torch.Tensor | None,
    mask: torch.Tensor | None,
    frame_mask: torch.Tensor | None,
    model_kwargs: Mapping[str, Any],
    cfg: bool,
    reserved: Collection[str],
) -> None:
    """Raise ValueError naming the argument whose shape or value does not fit `z` (B, C, T, H, W)."""
    _check_latent_and_text(z, y, y_null, cfg)
    batch = z.shape[0]
    if mask is not None and (mask.dim() != 2 or mask.shape != (batch, y.shape[2])):
        raise ValueError(f"mask must be (B, L) = {(batch, y.shape[2])}, got {tuple(mask.shape)}")
    # An empty caption in mask is refused by cut_text_keys, in the one host read of the mask per sample.
    if frame_mask is not None:
        if frame_mask.shape != (batch, z.shape[2]):
            raise ValueError(f"frame_mask must be (B, T) = {(batch, z.shape[2])}, got {tuple(frame_mask.shape)}")
        if bool(((frame_mask < 0) | (frame_mask > 1)).any()):
            raise ValueError("frame_mask values must lie in [0, 1]")
    clash = [k for k in reserved if k in model_kwargs]
    if clash:
        raise ValueError(f"model_kwargs must not contain {clash}: the sampler passes them itself")


def _check_latent_and_text(z: torch.Tensor, y: torch.Tensor, y_null: torch.Tensor | None, cfg: bool) -> None:
    if z.dim() != 5:
        raise ValueError(f"z must be (B, C, T, H, W), got shape {tuple(z.shape)}")
    if y.dim() != 4 or y.shape[1] != 1:
        raise ValueError(f"y must be (B, 1, L, C), got shape {tuple(y.shape)}")
    batch = z.shape[0]
    if batch < 1:
        raise ValueError(f"z has batch {batch}: give at least one video, shape (B >= 1, C, T, H, W)")
    if y.shape[0] != batch:
        raise ValueError(f"y has batch {y.shape[0]} but z has batch {batch}")
    if cfg:
        if y_null is None:
            raise ValueError("y_null is required when the guidance scale is not 1")
        if y_null.dim() != 4 or y_null.shape[0] not in (1, batch) or y_null.shape[1:] != y.shape[1:]:
            raise ValueError(f"y_null must be (B or 1, 1, L, C) like y {tuple(y.shape)}, got {tuple(y_null.shape)}")
