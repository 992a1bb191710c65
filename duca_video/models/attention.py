"""Attention kernels and the two attention modules of STDiT3.

Every attention call goes through `fused_attention`, which uses
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA, the fused CPU
kernel elsewhere) or xformers when it is installed and the tensors live on CUDA. No attention map is ever
materialised here. Keys nobody attends to are cut rather than masked wherever their positions are known
without reading device values: text keys past the batch's longest caption (`cut_text_keys`, once per sample)
and the sequence-parallel padding (always the tail of the gathered sequence). An unmasked call lets SDPA take
its flash kernel; `python -m duca_video.models.sdpa_probe` shows which kernel each site gets.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: only used on CUDA
    import xformers.ops as _xops  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _xops = None

# DUCA_ATTENTION=sdpa forces PyTorch's kernel even when xformers is installed (useful for comparisons).
_BACKEND = os.environ.get("DUCA_ATTENTION", "auto").lower()


def attention_backend(device: torch.device) -> str:
    if _BACKEND not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"DUCA_ATTENTION={_BACKEND!r}: allowed values are auto, sdpa, xformers")
    if _BACKEND == "sdpa" or device.type != "cuda" or _xops is None:
        if _BACKEND == "xformers" and (_xops is None or device.type != "cuda"):
            raise RuntimeError("DUCA_ATTENTION=xformers needs xformers installed and CUDA tensors")
        return "sdpa"
    return "xformers"


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention over (B, heads, N, D) tensors; `key_mask` (B, Nk) bool, True = attend."""
    if key_mask is None and attention_backend(q.device) == "xformers":
        out = _xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def text_key_cut(mask: torch.Tensor) -> tuple[int, bool]:
    """For a (B, L) text mask (nonzero = valid): how many leading keys hold every valid token of the batch, and
    whether every row is valid on all of them (then no mask is needed and SDPA may take its flash kernel).

    Reads the mask's values once (a host-device sync for a device mask): call it once per sample, not per step.
    """
    valid = mask != 0
    position = torch.arange(1, valid.shape[1] + 1, device=valid.device)
    # One small transfer: per row, the valid count and the position just after its last valid token.
    counts, ends = torch.stack((valid.sum(1), (valid * position).amax(1))).tolist()
    if min(counts, default=1) == 0:
        raise ValueError("every caption needs at least one valid token in mask")
    keep = max(ends, default=valid.shape[1])
    return keep, all(n == keep for n in counts)


def cut_text_keys(y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the text positions no row attends to: y (B, 1, L, C) -> (B, 1, L', C), mask (B, L) -> (B, L') or
    None when every row is valid on all L' positions. Cross-attention gives the same result (masked keys have
    zero weight), on ~40 keys instead of 300 for a typical prompt, and with no mask when the lengths agree."""
    if mask is None:
        return y, mask
    keep, full = text_key_cut(mask)
    return y[:, :, :keep], None if full else mask[:, :keep]


class RMSNorm(nn.Module):
    """Per-head q/k norm (LlamaRMSNorm): statistics in fp32, weight applied in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the sequence axis, with interleaved pairs (rotary-embedding-torch's
    convention, so the checkpoint's `rope.freqs` buffer is used as is)."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape (..., N, D) by position 0..N-1 along N."""
        n = x.shape[-2]
        angles = torch.arange(n, device=x.device, dtype=self.freqs.dtype)[:, None] * self.freqs
        angles = angles.repeat_interleave(2, dim=-1)
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return (x * angles.cos() + rotated * angles.sin()).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused qkv (bias), optional per-head RMS q/k norm and RoPE.

    `rope` is a plain callable, not a submodule, so the checkpoint holds one `rope.freqs` for the model.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, rope: Callable | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.__dict__["rope"] = rope  # bypass Module registration on purpose

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> q, k, v as (B, heads, N, head_dim), normalised and rotated."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        out = fused_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens; each sample only to its own valid tokens.

    The text arrives cut to the batch's longest caption (see `cut_text_keys`); when rows still differ in length
    their mask becomes a boolean key mask (B, 1, 1, L) for one batched SDPA call: no Python loop over the batch
    and no packing of variable-length captions. With no mask (lengths agree) SDPA may use its flash kernel.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C) video tokens; cond (B, L, C) projected captions; key_mask (B, L) bool or None."""
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(cond).view(b, cond.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = fused_attention(q, k, v, key_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))
