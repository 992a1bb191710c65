"""Sequence parallelism for STDiT3: tokens split along the spatial axis, Ulysses attention for spatial blocks.

Each rank of a sequence-parallel (SP) group holds the tokens of a contiguous range of spatial positions, for
every frame. Temporal attention, cross-attention, the MLP and the final layer work token by token (or along
time), so they run locally with no communication. Only spatial self-attention needs every position: an
all-to-all swaps "my tokens, all heads" for "all tokens, my heads" and back. Any spatial size works: S is
padded up to a multiple of the group size; the padding sits at the end of the gathered sequence, so spatial
attention simply cuts it from the keys (no mask: SDPA keeps its flash kernel) and crops it at the output.

Applied from outside the model (`parallelize_stdit3(model, group)`, torchtitan's pattern): the model's
embedding is wrapped to keep this rank's positions, its spatial attention modules run `ulysses_attention`, its
per-token output is gathered before unpatchifying; `models/stdit3.py` itself is single-device code and the
cache finds the layout with `layout_of(model)`.

Two output modes. By default the model returns the whole prediction on every rank (Open-Sora's contract;
one all-gather per forward). In sharded mode (`gather_output=False`, what the pipeline uses) each rank returns
a full-size tensor that is only valid on the positions it owns; the sampler's per-position update keeps the
latent valid there, and `gather_latents` assembles it once per sample. Then steps that reuse the cached
attention (conservative, aggressive) need no collective at all.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.attention import fused_attention
from .comm import (
    CommStats,
    Group,
    all_gather_tokens,
    all_reduce_sum,
    group_rank,
    group_size,
    heads_to_seq,
    seq_to_heads,
)

# model -> its layout; kept outside the model so that the model's code never reads parallel state.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class SequenceParallel:
    group: Group
    gather_output: bool = True
    stats: CommStats = field(default_factory=CommStats)
    # Geometry of the current forward (set by `shard`)
    s_global: int = 0
    s_padded: int = 0
    s_local: int = 0

    @property
    def size(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return group_rank(self.group)

    @property
    def start(self) -> int:
        return self.rank * self.s_local

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, S, C) -> my tokens (B, T * s_local, C), padding S up to a multiple of the group size."""
        b, t, s, c = tokens.shape
        p = self.size
        self.s_global, self.s_padded = s, -(-s // p) * p
        self.s_local = self.s_padded // p
        if self.s_padded != s:
            tokens = torch.cat([tokens, tokens.new_zeros(b, t, self.s_padded - s, c)], dim=2)
        return tokens[:, :, self.start : self.start + self.s_local].reshape(b, t * self.s_local, c)

    def key_mask(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """(rows, s_padded) True for real positions, or None when there is no padding. Attention does not use it
        (it cuts the keys to `s_global` instead: the padding is always the tail); kept for other consumers."""
        if self.s_padded == self.s_global:
            return None
        return (torch.arange(self.s_padded, device=device) < self.s_global).expand(rows, -1)

    def local_valid(self, frames: int, device: torch.device) -> torch.Tensor:
        """(frames * s_local,) True for my tokens that are real positions (not padding)."""
        pos = self.start + torch.arange(self.s_local, device=device)
        return (pos < self.s_global).repeat(frames)

    def unshard(self, out: torch.Tensor, frames: int) -> torch.Tensor:
        """My per-token outputs (B, T * s_local, P) -> (B, T * S, P): gathered from every rank, or, in sharded
        mode, zeros outside my positions."""
        b, _, width = out.shape
        local = out.view(b, frames, self.s_local, width)
        if self.gather_output:
            parts = all_gather_tokens(local, self.group, self.stats, "gather_output")  # (p, B, T, s_loc, P)
            full = parts.permute(1, 2, 0, 3, 4).reshape(b, frames, self.s_padded, width)
        else:
            full = local.new_zeros(b, frames, self.s_padded, width)
            full[:, :, self.start : self.start + self.s_local] = local
        return full[:, :, : self.s_global].reshape(b, frames * self.s_global, width)

    def gather_scores(self, scores: torch.Tensor, frames: int) -> torch.Tensor:
        """Per-token scores of my tokens (B, T * s_local) -> the whole grid (B, T * S) on every rank."""
        b = scores.shape[0]
        parts = all_gather_tokens(scores.view(b, frames, self.s_local), self.group, self.stats, "gather_scores")
        full = parts.permute(1, 2, 0, 3).reshape(b, frames, self.s_padded)[:, :, : self.s_global]
        return full.reshape(b, frames * self.s_global)

    def to_local(self, idx: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Global token indices (B, k) over (T, S) -> my local indices (B, k_local) over (T, s_local).

        Rows keep different numbers of tokens, so short rows are padded with a repeat of one of their tokens
        (or token 0 when they have none); `pad` marks those entries, whose result must not be written back."""
        t_of, pos = idx // self.s_global, idx % self.s_global
        mine = (pos >= self.start) & (pos < self.start + self.s_local)
        local = t_of * self.s_local + (pos - self.start)
        counts = mine.sum(dim=1)
        width = int(counts.max()) if counts.numel() else 0
        order = torch.argsort((~mine).to(torch.int8), dim=1, stable=True)[:, :width]  # mine first, in order
        picked = local.gather(1, order)
        pad = torch.arange(width, device=idx.device)[None] >= counts[:, None]
        if not bool(pad.any()):
            return picked, None
        filler = torch.where(counts[:, None] > 0, picked[:, :1], torch.zeros_like(picked[:, :1]))
        return torch.where(pad, filler, picked), pad

    def owned_positions(self, latent_shape: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
        """(T, H, W) bool: the latent positions whose tokens this rank computes."""
        t, h, w = latent_shape
        _, ph, pw = patch
        grid_w = -(-w // pw)
        rows = torch.arange(h) // ph
        cols = torch.arange(w) // pw
        token = rows[:, None] * grid_w + cols[None, :]  # (H, W) spatial token index
        mine = (token >= self.start) & (token < self.start + self.s_local)
        return mine[None].expand(t, h, w)

    def gather_latents(self, z: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
        """Sharded mode: assemble the latent (B, C, T, H, W) from each rank's owned positions (one all-reduce)."""
        mask = self.owned_positions(tuple(z.shape[2:]), patch).to(z.device)
        return all_reduce_sum(torch.where(mask, z, torch.zeros_like(z)), self.group, self.stats, "gather_latents")


def check_sp_size(num_heads: int, sp_size: int) -> None:
    """Ulysses gives each rank num_heads / sp_size heads: check before any weight is loaded."""
    if sp_size < 1 or num_heads % sp_size:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"sequence parallelism over {sp_size} ranks needs num_heads ({num_heads}) divisible by "
            f"it; allowed SP sizes: {divisors}"
        )


def ulysses_attention(attn: nn.Module, sp: SequenceParallel, x: torch.Tensor) -> torch.Tensor:
    """A SelfAttention over sequences split across the SP group (x holds my tokens of each): trade them for all
    tokens of my heads (all-to-all), attend, trade back. Same weights and result as `attn(x)` on one process."""
    b, n, c = x.shape
    q, k, v = attn.qkv(x).view(b, n, 3, attn.num_heads, attn.head_dim).unbind(2)
    qkv = torch.stack((attn.q_norm(q), attn.k_norm(k), v), dim=2)  # per-head norms: fine before the swap
    q, k, v = seq_to_heads(qkv, sp.group, sp.stats).permute(2, 0, 3, 1, 4).unbind(0)
    if attn.rope is not None:  # rotary positions need the whole sequence (spatial attention has none)
        q, k = attn.rope(q), attn.rope(k)
    real = sp.s_global  # a Python int: no sync
    if k.shape[2] != real:  # padded positions: cut them from the keys (no mask, so flash can run); the
        k, v = k[:, :, :real], v[:, :, :real]  # padded queries still get outputs, which nothing reads
    out = fused_attention(q, k, v)  # (b, heads/p, S_padded, d)
    out = heads_to_seq(out.transpose(1, 2), sp.group, sp.stats)  # (b, n, heads, d)
    return attn.proj(out.reshape(b, n, c))


def layout_of(model: nn.Module) -> SequenceParallel | None:
    """The token layout `parallelize_stdit3` gave `model` (what the cache reads), or None (one process)."""
    return _LAYOUTS.get(model)


def parallelize_stdit3(model: nn.Module, group: Group, gather_output: bool = True) -> SequenceParallel:
    """Split `model`'s tokens over `group`, from outside the model (see the module docstring): its embedding is
    wrapped to keep this rank's spatial positions, every spatial self-attention runs Ulysses, and the per-token
    output is gathered (or, in sharded mode, placed) before unpatchifying. The model's own code stays
    single-device; `disable_sequence_parallel` undoes all of it."""
    check_sp_size(model.config.num_heads, group_size(group))
    disable_sequence_parallel(model)
    sp = SequenceParallel(group, gather_output=gather_output)
    embed, unpatchify = model.embed, model.unpatchify

    def sharded_embed(*args, **kwargs):
        e = embed(*args, **kwargs)
        b, n, c = e.x.shape
        frames = e.grid[0]
        tokens = sp.shard(e.x.view(b, frames, n // frames, c))  # my spatial positions of every frame
        return dataclasses.replace(e, x=tokens, seq=sp.s_local)

    def gathered_unpatchify(x: torch.Tensor, e) -> torch.Tensor:
        # The final layer is per token: gather its small output, not the hidden states.
        return unpatchify(sp.unshard(x, e.grid[0]), e)

    model.embed, model.unpatchify = sharded_embed, gathered_unpatchify
    for block in model.spatial_blocks:
        block.attn.forward = functools.partial(ulysses_attention, block.attn, sp)
    _LAYOUTS[model] = sp
    return sp


def disable_sequence_parallel(model: nn.Module) -> None:
    """Back to one process: the model's own embedding, attention and unpatchify."""
    for name in ("embed", "unpatchify"):
        model.__dict__.pop(name, None)
    for block in getattr(model, "spatial_blocks", ()):
        block.attn.__dict__.pop("forward", None)
    _LAYOUTS.pop(model, None)
