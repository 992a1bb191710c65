"""An identity "VAE" for pixel-space models: latents are the pixels themselves, in [-1, 1].

It has the `OpenSoraVAE` inference interface (encode / decode / get_latent_size / out_channels / dtype /
device), so a pixel-space STDiT3 runs through the same pipeline code as the real latent model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PixelVAE"]


class PixelVAE(nn.Module):
    in_channels = 3
    out_channels = 3

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        # No weights; an empty buffer carries dtype and device through .to() like a real module.
        self.register_buffer("_anchor", torch.zeros(0, dtype=dtype), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @staticmethod
    def _check(t: torch.Tensor, what: str) -> None:
        if t.ndim != 5 or t.shape[1] != 3:
            raise ValueError(f"{what} must have shape (B, 3, T, H, W); got {tuple(t.shape)}")

    def get_latent_size(self, input_size: Sequence[int | None]) -> tuple[int | None, ...]:
        return tuple(input_size[:3])

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, T, H, W) pixels in [-1, 1] -> the same tensor (in this module's dtype)."""
        self._check(x, "x")
        return x.to(device=self.device, dtype=self.dtype)

    def decode(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Latent = pixels, clamped to [-1, 1]; `num_frames` must match T when given (as OpenSoraVAE checks)."""
        self._check(z, "z")
        if num_frames is not None and num_frames != z.shape[2]:
            raise ValueError(f"num_frames={num_frames} but z has {z.shape[2]} frames")
        return z.clamp(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
