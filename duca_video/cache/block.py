"""The cached block forward: each module of an STDiT3 block is computed (for all tokens or the selected rows) or
asked of the method's policy, as the plan of the step says. It reads like the paper's block:

    attn  = compute | policy.approximate(index, "attn") | computed, with the selected rows refreshed
    x     = x + gate_msa * attn
    cross = compute | policy.approximate(index, "cross") | the selected rows recomputed
    x     = x + cross
    mlp   = compute | policy.approximate(index, "mlp") | the selected rows recomputed
    x     = x + gate_mlp * mlp

then `policy.update` keeps what a later step reads. A mixin of `plugin.CacheController` (its sample, plan,
state and the selection / folding mixins).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..models.stdit3 import block_modulation, block_self_attention, gate_tokens, modulate_tokens
from .methods.token import selection as sel
from .methods.token.folding import rows_param, write_rows
from .schedule import Action

# The projections whose outputs a selector reads (by Open-Sora's attribute names, ours and upstream's alike).
_CAPTURED = (("attn", "qkv", "qkv"), ("cross_attn", "q_linear", "q"), ("cross_attn", "kv_linear", "kv"))


class BlockMixin:
    _grab: dict[str, torch.Tensor] | None = None  # where the capture hooks write, while a full step captures
    _grab_keys: tuple[str, ...] = ()

    def _install_capture(self) -> list[Any]:
        """Forward hooks, registered once at install (not per call: a compiled module would recompile), that keep
        a projection's output while a full step computes it anyway, for the selector's statistic. They store
        only inside `_capturing`."""
        handles = []
        for block in self.blocks:
            for parent, name, key in _CAPTURED:
                module = getattr(getattr(block, parent), name)
                handles.append(module.register_forward_hook(functools.partial(self._grab_output, key)))
        return handles

    def _grab_output(self, key: str, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if self._grab is not None and key in self._grab_keys:
            self._grab[key] = output

    @contextmanager
    def _capturing(self, sink: dict[str, torch.Tensor], *keys: str) -> Iterator[None]:
        self._grab, self._grab_keys = sink, keys
        try:
            yield
        finally:
            self._grab, self._grab_keys = None, ()

    def _needs_scores(self, kind: str) -> str | None:
        """Which selector statistic this full step must capture for later conservative steps."""
        selector = getattr(self.config, "selector", None)
        if selector is None or not self.config.recompute:
            return None
        if selector in ("k_norm", "v_norm") and self.plan.action(kind, "attn") is Action.COMPUTE:
            return "qkv"
        if selector == "cross_entropy" and self.plan.action(kind, "cross") is Action.COMPUTE:
            return "cross"
        return None

    def _run_block(self, index, block, x, y, t, mask, x_mask, t0, T, S):
        """One block: each module computed (all tokens or the selected rows) or asked of the policy."""
        kind = "temporal" if block.temporal else "spatial"
        acts, keep = self.plan.actions[kind], self.plan.keep[kind]
        if self.state.has(index, "folded"):
            return self._run_folded(index, block, x, t, x_mask, t0, S, acts)
        capture = self._needs_scores(kind)
        if all(a is Action.COMPUTE for a in acts.values()) and not keep and capture is None:
            for name in self.state.names(index):  # nothing of this block is read later
                if name != "age":
                    self.state.drop(index, name)
            return type(block).forward(block, x, y, t, mask, x_mask, t0, T, S)

        mod = block_modulation(block, t, x_mask, t0)  # shift/scale/gate of self-attention, then of the MLP
        rows = self._select(index, x, T, S) if Action.PARTIAL in acts.values() else None
        grabbed: dict[str, torch.Tensor] = {}
        attn = self._self_attention(index, block, x, mod, acts["attn"], rows, T, S, grabbed, capture)
        x = x + gate_tokens(mod[2], attn)
        cross = self._cross_attention(index, block, x, y, mask, acts["cross"], rows, grabbed, capture)
        x = x + cross
        mlp = self._mlp(index, block, x, mod, acts["mlp"], rows, S)
        x = x + gate_tokens(mod[5], mlp)

        fold = x_mask is None and self.config.fold_ok and self._can_fold(kind)
        if fold:  # the folded tensor serves the next step; keep separately only what a later step reads
            keep = keep & self.plans[self.step + 1].keep[kind]
        for module, value in (("attn", attn), ("cross", cross), ("mlp", mlp)):
            if acts[module] is not Action.REUSE or module not in keep:
                self.sample.policy.update(index, module, value, module in keep)
            self._count(module, acts[module], value, rows)
        if capture:
            self._store_scores(index, block, grabbed, mask, T, S)
        if fold:
            self._store_folded(index, block, x.shape[0], attn, cross, mlp, T, S, x)
        return x

    def _self_attention(self, index, block, x, mod, act, rows, T, S, grabbed, capture) -> torch.Tensor:
        # A partial recompute needs every token's keys and values, so it runs in full; the selected rows refresh.
        if act is Action.REUSE:
            return self.sample.policy.approximate(index, "attn")
        with self._capturing(grabbed, *(("qkv",) if capture == "qkv" else ())):
            attn = block_self_attention(block, modulate_tokens(block.norm1(x), mod[0], mod[1]), T, S)
        if act is Action.PARTIAL:
            idx, pad = rows
            attn = write_rows(self.state.get(index, "attn"), idx, pad, sel.gather_tokens(attn, idx))
        return attn

    def _cross_attention(self, index, block, x, y, mask, act, rows, grabbed, capture) -> torch.Tensor:
        if act is Action.REUSE:
            return self.sample.policy.approximate(index, "cross")
        if act is Action.PARTIAL:
            idx, pad = rows
            return write_rows(
                self.state.get(index, "cross"), idx, pad, block.cross_attn(sel.gather_tokens(x, idx), y, mask)
            )
        with self._capturing(grabbed, *(("q", "kv") if capture == "cross" else ())):
            return block.cross_attn(x, y, mask)

    def _mlp(self, index, block, x, mod, act, rows, S) -> torch.Tensor:
        if act is Action.REUSE:
            return self.sample.policy.approximate(index, "mlp")
        if act is Action.PARTIAL:
            idx, pad = rows
            part = sel.gather_tokens(x, idx)
            h = block.norm2(part) * (1 + rows_param(mod[4], idx, S)) + rows_param(mod[3], idx, S)
            return write_rows(self.state.get(index, "mlp"), idx, pad, block.mlp(h))
        return block.mlp(modulate_tokens(block.norm2(x), mod[3], mod[4]))

    def _count(self, module: str, act: Action, value: torch.Tensor, rows) -> None:
        """The summary's share of tokens recomputed per module."""
        stats = self.history[-1] if self.history else None
        if stats is None:
            return
        n = value.shape[0] * value.shape[1]
        done = n if act is Action.COMPUTE else (self._rows_picked(*rows) if act is Action.PARTIAL else 0)
        stats["recomputed"][module] = stats["recomputed"].get(module, 0) + done
        stats["tokens"][module] = stats["tokens"].get(module, 0) + n
