"""Embedders, MLP and final layer of STDiT3, with Open-Sora 1.2's parameter names."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm's Mlp names, which the checkpoints use)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PatchEmbed3D(nn.Module):
    """Conv3d patchify; the input is zero-padded at the end of each axis up to a patch multiple."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, T'*H'*W', hidden) with T outermost."""
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        x = F.pad(x, (0, -w % pw, 0, -h % ph, 0, -t % pt))
        return self.proj(x).flatten(2).transpose(1, 2)


def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) scalars -> (N, dim) [cos | sin] features, always computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """256-d sinusoid -> Linear -> SiLU -> Linear. Also used for fps (Open-Sora's SizeEmbedder)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoid(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Projects text-encoder features to the model width; holds the learned null caption used for CFG."""

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int) -> None:
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


@functools.lru_cache(maxsize=64)
def _pos_embed_2d(dim: int, h: int, w: int, scale: float, base_size: int, device: torch.device) -> torch.Tensor:
    """2D sin/cos table (h*w, dim), row-major over (h, w).

    The first half of the channels encodes the column (w) coordinate and the second half the row (h): that is
    what Open-Sora 1.2's PositionEmbedding2D computes (its meshgrid swaps the axes), and the weights expect it.
    """
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))
    rows = torch.arange(h, device=device) / scale * (base_size / h)
    cols = torch.arange(w, device=device) / scale * (base_size / w)
    col_grid = cols[None, :].expand(h, w).reshape(-1)
    row_grid = rows[:, None].expand(h, w).reshape(-1)

    def table(pos: torch.Tensor) -> torch.Tensor:
        out = pos[:, None] * inv_freq[None]
        return torch.cat([out.sin(), out.cos()], dim=-1)

    return torch.cat([table(col_grid), table(row_grid)], dim=-1)


def pos_embed_2d(
    dim: int, h: int, w: int, scale: float, base_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    if dim % 4:
        raise ValueError(f"hidden_size {dim} must be divisible by 4 for the 2D position embedding")
    return _pos_embed_2d(dim, h, w, float(scale), int(base_size), device).to(dtype)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) modulated by `scale_shift_table` + t, then a linear to patch pixels."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, x_mask: torch.Tensor | None = None, t0: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T*S, C); t (B, C); with x_mask (B, T) the frames where it is False use t0 instead of t."""
        b, n, c = x.shape
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, C) each
        h = modulate(self.norm_final(x), shift, scale)
        if x_mask is None:
            return self.linear(h)
        # Open-Sora 1.2 normalises the *already modulated* tensor again for the clean frames; the released
        # weights were trained with this, so it is kept (it only affects frames where x_mask is False).
        shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
        h0 = modulate(self.norm_final(h), shift0, scale0)
        frames = x_mask.shape[1]
        h = torch.where(x_mask[:, :, None, None], h.view(b, frames, -1, c), h0.view(b, frames, -1, c))
        return self.linear(h.view(b, n, c))
