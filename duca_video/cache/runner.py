"""The cached block forward: each module of an STDiT3 block is computed (for all tokens or the selected rows) or
asked of the method's policy, as the plan of the step says. It reads like the paper's block:

    attn  = compute | policy.approximate(index, "attn") | computed, with the selected rows refreshed
    x     = x + gate_msa * attn
    cross = compute | policy.approximate(index, "cross") | the selected rows recomputed
    x     = x + cross
    mlp   = compute | policy.approximate(index, "mlp") | the selected rows recomputed
    x     = x + gate_mlp * mlp

then `policy.update` keeps what a later step reads. Everything a block needs of the step is passed in: the block's
own call (`BlockCall`) and the step (`StepContext`: the sample, its plan, policy and store, and the token family's
selector and folder when the method has them). Nothing here keeps state between calls.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.stdit3 import block_modulation, block_self_attention, gate_tokens, modulate_tokens
from .methods.token import selection as sel
from .methods.token.drawing import Selector
from .methods.token.folding import Folder, rows_param, write_rows
from .policy import CachePolicy, Sample
from .schedule import Action, StepPlan
from .state import CacheState

Rows = tuple[torch.Tensor, "torch.Tensor | None"]  # the selected tokens (B, k) and their padding under SP


@dataclass
class BlockCall:
    """One block's call, as Open-Sora's blocks take it: `(x, y, t, mask, x_mask, t0, T, S)`."""

    x: torch.Tensor
    y: Any
    t: torch.Tensor
    mask: Any = None
    x_mask: torch.Tensor | None = None
    t0: torch.Tensor | None = None
    T: int | None = None
    S: int | None = None

    def plain(self, block: nn.Module) -> torch.Tensor:
        """The block's own forward, uncached."""
        return type(block).forward(block, self.x, self.y, self.t, self.mask, self.x_mask, self.t0, self.T, self.S)


@dataclass(frozen=True)
class StepContext:
    """What every block of one step reads: the sample, its plan and the next one, its policy and store, and the
    token family's parts (None for a method without them)."""

    sample: Sample
    plan: StepPlan
    policy: CachePolicy
    store: CacheState
    selector: Selector | None = None
    folder: Folder | None = None

    @classmethod
    def of(cls, sample: Sample, selector: Selector | None, folder: Folder | None) -> StepContext:
        return cls(sample, sample.plan, sample.policy, sample.store, selector, folder)

    @property
    def next_plan(self) -> StepPlan | None:
        step = self.sample.step + 1
        return self.sample.plans[step] if step < len(self.sample.plans) else None


def run_block(ctx: StepContext, index: int, block: nn.Module, call: BlockCall) -> torch.Tensor:
    """One block: each module computed (all tokens or the selected rows) or asked of the policy."""
    kind = "temporal" if block.temporal else "spatial"
    acts, keep, store = ctx.plan.actions[kind], ctx.plan.keep[kind], ctx.store
    if store.has(index, "folded"):
        return ctx.folder.run_folded(ctx.sample, index, block, call.x, call.t, call.x_mask, call.t0, call.S)
    capture = ctx.selector.needs_scores(ctx.plan, kind) if ctx.selector is not None else None
    if all(a is Action.COMPUTE for a in acts.values()) and not keep and capture is None:
        for name in store.names(index):  # nothing of this block is read later
            if name != "age":
                store.drop(index, name)
        return call.plain(block)

    x, T, S = call.x, call.T, call.S
    mod = block_modulation(block, call.t, call.x_mask, call.t0)  # shift/scale/gate of self-attention, then MLP
    rows = ctx.selector.select(ctx.sample, index, x, T, S) if Action.PARTIAL in acts.values() else None
    grabbed: dict[str, torch.Tensor] = {}
    attn = _self_attention(ctx, index, block, x, mod, acts["attn"], rows, (T, S), (grabbed, capture))
    x = x + gate_tokens(mod[2], attn)
    cross = _cross_attention(ctx, index, block, x, call, acts["cross"], rows, (grabbed, capture))
    x = x + cross
    mlp = _mlp(ctx, index, block, x, mod, acts["mlp"], rows, S)
    x = x + gate_tokens(mod[5], mlp)

    fold = call.x_mask is None and ctx.folder is not None and ctx.folder.can_fold(ctx.sample, kind)
    if fold:  # the folded tensor serves the next step; keep separately only what a later step reads
        keep = keep & ctx.next_plan.keep[kind]
    for module, value in (("attn", attn), ("cross", cross), ("mlp", mlp)):
        if acts[module] is not Action.REUSE or module not in keep:
            ctx.policy.update(index, module, value, module in keep)
        _count(ctx, module, acts[module], value, rows)
    if capture:
        ctx.selector.store_scores(ctx.sample, index, block, grabbed, call.mask, T, S)
    if fold:
        ctx.folder.store_folded(ctx.sample, ctx.selector, index, block, (attn, cross, mlp), T, S, x)
    return x


def _self_attention(ctx, index, block, x, mod, act, rows, grid, capture) -> torch.Tensor:
    # A partial recompute needs every token's keys and values, so it runs in full; the selected rows refresh.
    if act is Action.REUSE:
        return ctx.policy.approximate(index, "attn")
    grabbed, wanted = capture
    keys = ("qkv",) if wanted == "qkv" else ()
    with ctx.selector.capturing(grabbed, *keys) if keys else nullcontext():
        attn = block_self_attention(block, modulate_tokens(block.norm1(x), mod[0], mod[1]), *grid)
    if act is Action.PARTIAL:
        idx, pad = rows
        attn = write_rows(ctx.store.get(index, "attn"), idx, pad, sel.gather_tokens(attn, idx))
    return attn


def _cross_attention(ctx, index, block, x, call: BlockCall, act, rows, capture) -> torch.Tensor:
    if act is Action.REUSE:
        return ctx.policy.approximate(index, "cross")
    if act is Action.PARTIAL:
        idx, pad = rows
        recomputed = block.cross_attn(sel.gather_tokens(x, idx), call.y, call.mask)
        return write_rows(ctx.store.get(index, "cross"), idx, pad, recomputed)
    grabbed, wanted = capture
    keys = ("q", "kv") if wanted == "cross" else ()
    with ctx.selector.capturing(grabbed, *keys) if keys else nullcontext():
        return block.cross_attn(x, call.y, call.mask)


def _mlp(ctx, index, block, x, mod, act, rows, S) -> torch.Tensor:
    if act is Action.REUSE:
        return ctx.policy.approximate(index, "mlp")
    if act is Action.PARTIAL:
        idx, pad = rows
        part = sel.gather_tokens(x, idx)
        h = block.norm2(part) * (1 + rows_param(mod[4], idx, S)) + rows_param(mod[3], idx, S)
        return write_rows(ctx.store.get(index, "mlp"), idx, pad, block.mlp(h))
    return block.mlp(modulate_tokens(block.norm2(x), mod[3], mod[4]))


def _count(ctx: StepContext, module: str, act: Action, value: torch.Tensor, rows: Rows | None) -> None:
    """The summary's share of tokens recomputed per module."""
    history = ctx.sample.history
    if not history:
        return
    stats = history[-1]
    n = value.shape[0] * value.shape[1]
    done = n if act is Action.COMPUTE else (ctx.selector.rows_picked(ctx.sample, *rows) if act is Action.PARTIAL else 0)
    stats["recomputed"][module] = stats["recomputed"].get(module, 0) + done
    stats["tokens"][module] = stats["tokens"].get(module, 0) + n
