"""The cache under upstream Open-Sora's own sequence parallelism (`opensora.acceleration.parallel_states`).

Upstream STDiT3 with `enable_sequence_parallelism=True` splits the tokens (B, T, S, C) along S over the group
that `set_sequence_parallel_group` set, in equal contiguous chunks (S must divide by the group size), runs
Ulysses all-to-alls around spatial self- and cross-attention, and all-gathers the tokens before the final layer.
The cache reads the group from the very function the model's module calls, and describes the token layout
with our `SequenceParallel` (no padding: upstream has none), so that:
  - every rank keeps only the cache of its own tokens (the blocks only ever see those);
  - token selection is drawn over the whole grid and each rank keeps its share (same choice as one process);
  - TeaCache's signal is summed over the group, so every rank takes the same decision.
Cross-attention is per token (each image token attends to its own prompt's text), so it needs no collective:
the cache runs it locally. That lets a conservative step recompute a few rows of it with no all-to-all, and it
also avoids v1.2.0's SeqParallelMultiHeadCrossAttention, whose block-diagonal text mask assumes the queries of
one sample are contiguous after its all-to-all, which mixes up the samples of a batch when B > 1 (always the
case with classifier-free guidance): with the cache enabled, 2 ranks give the one-process video.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..parallel.sequence import SequenceParallel

_LOCAL = "_duca_local_cross_attention"


def upstream_sp_group(model: nn.Module) -> Any | None:
    """The SP group of an upstream STDiT3 built with sequence parallelism, or None (one process, or ours)."""
    if not getattr(model, "enable_sequence_parallelism", False):
        return None
    getter = getattr(sys.modules.get(type(model).__module__), "get_sequence_parallel_group", None)
    group = getter() if callable(getter) else None
    if group is None or not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return None
    return group


class UpstreamLayout(SequenceParallel):
    """Our token-layout interface over upstream's split: rank r holds spatial positions [r*s, (r+1)*s)."""

    def set_local(self, s_local: int) -> None:
        """The spatial tokens per frame this rank holds in the current forward (upstream's block argument S)."""
        self.s_local, self.s_global = s_local, s_local * self.size
        self.s_padded = self.s_global


def local_cross_attention(module: nn.Module, x: torch.Tensor, cond: torch.Tensor, lens: Any = None) -> torch.Tensor:
    """Upstream's MultiHeadCrossAttention on this rank's tokens only: x (B, n, C), cond the packed text
    (1, sum(lens), C) and lens the text length of each sample (None: every query sees all the text, as
    upstream without a mask). Same weights and conventions, no collective."""
    b, n, c = x.shape
    heads = module.num_heads
    d = c // heads
    q = module.q_linear(x).view(b, n, heads, d).transpose(1, 2)  # (B, H, n, d)
    kv = module.kv_linear(cond).reshape(-1, 2, heads, d)  # (sum L, 2, H, d)
    if lens is None:
        k, v = kv.permute(1, 2, 0, 3)[:, None]  # every sample attends to all of it
        out = F.scaled_dot_product_attention(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
    else:
        parts = []
        for i, part in enumerate(kv.split([int(v) for v in lens])):
            k, v = part.permute(1, 2, 0, 3)  # (H, L_i, d)
            parts.append(F.scaled_dot_product_attention(q[i], k, v))
        out = torch.stack(parts)
    out = module.proj(out.transpose(1, 2).reshape(b, n, c))
    drop = getattr(module, "proj_drop", None)
    return drop(out) if drop is not None else out


def localize_cross_attention(blocks: list[nn.Module]) -> None:
    """Run every block's cross-attention locally (see the module docstring); `restore_cross_attention` undoes it."""
    for block in blocks:
        attn = block.cross_attn
        if _LOCAL not in attn.__dict__:
            attn.__dict__[_LOCAL] = True
            attn.forward = functools.partial(local_cross_attention, attn)


def restore_cross_attention(blocks: list[nn.Module]) -> None:
    for block in blocks:
        attn = block.cross_attn
        if attn.__dict__.pop(_LOCAL, None):
            attn.__dict__.pop("forward", None)
