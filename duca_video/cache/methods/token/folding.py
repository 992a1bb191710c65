"""Folding: one tensor per block instead of three, for a full step whose outputs have one conservative reader.

A full step at t computes attn, cross and mlp for every token. When the only later reader is the next step t',
a conservative one that reuses attn and cross whole and recomputes the MLP for a known set of rows (the random
draw depends only on (seed, step, block), so it is known now), then t' needs only
    folded = gate_msa(t') * attn + cross + gate_mlp(t') * mlp              (every token)
    rows   = (gate_msa(t') * attn + cross)[selected]                       (the recomputed tokens)
and the block output at t' is x + folded, with the selected rows replaced by rows + x + gate_mlp(t') * MLP(...).
gate(t') comes from the model's own timestep path (t_embedder, fps_embedder, t_block) at the next timestep.
"""

from __future__ import annotations

import torch

from duca_video.models.layers import sinusoid
from duca_video.models.stdit3 import block_modulation, gate_tokens

from ...schedule import Action
from . import selection as sel


def rows_param(p: torch.Tensor, idx: torch.Tensor, S: int) -> torch.Tensor:
    """A (B, Tm, 1, C) modulation tensor for the tokens idx (B, k): per frame when Tm > 1."""
    if p.shape[1] == 1:
        return p[:, 0]
    return p[:, :, 0].gather(1, (idx // S)[..., None].expand(-1, -1, p.shape[-1]))


def write_rows(cache: torch.Tensor, idx: torch.Tensor, pad: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Write recomputed rows into `cache` in place; padded entries (sequence parallel) are not written."""
    if pad is None:
        return sel.scatter_tokens_(cache, idx, rows)
    if cache.is_meta:  # FLOP / traffic counting on the meta device: nothing to write
        return cache
    keep = ~pad
    batch = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
    cache[batch[keep], idx[keep]] = rows[keep].to(cache.dtype)
    return cache


def count_rows(idx: torch.Tensor, pad: torch.Tensor | None) -> int:
    return idx.numel() - (0 if pad is None else int(pad.sum()))


class FoldingMixin:
    """Folding for CacheController (uses its plan, state, step, timesteps, model and _select)."""

    def _can_fold(self, kind: str) -> bool:
        """This full step's attn/mlp outputs are read by exactly one later step, a conservative one that
        reuses attn and cross whole: then only their gated sum (and the rows it recomputes) is needed."""
        cfg, s = self.config, self.step
        if not self.fold or self._fps_emb is None or getattr(cfg, "selector", None) is None or s + 1 >= len(self.plans):
            return False
        cur, nxt = self.plan.actions[kind], self.plans[s + 1]
        after = nxt.actions[kind]
        return (
            nxt.kind == "conservative"
            and cur["attn"] is Action.COMPUTE
            and cur["mlp"] is Action.COMPUTE
            and after["attn"] is Action.REUSE
            and after["cross"] is Action.REUSE
            and after["mlp"] in (Action.REUSE, Action.PARTIAL)
            and not {"attn", "mlp"} & nxt.keep[kind]
            and cfg.selector not in ("min_similarity", "max_similarity")  # these look at the next step's input
            and cfg.age_bonus == 0
        )

    def _t_mlp_of_next_step(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """The model's t_block output at the next step's timestep: the same ops the model will run then."""
        step = self.step + 1
        sample = self.sample
        if sample.tokens.next_t_mlp is None or sample.tokens.next_t_mlp[0] != step:
            embedder = self.model.t_embedder
            t = torch.full((rows,), self.timesteps[step], device=like.device).to(like.dtype)
            freq = sinusoid(t, embedder.frequency_embedding_size).to(like.dtype)
            sample.tokens.next_t_mlp = (step, self.model.t_block(embedder.mlp(freq) + self._fps_emb))
        return sample.tokens.next_t_mlp[1]

    def _store_folded(self, index, block, rows, attn, cross, mlp, T, S, x) -> None:
        _, _, gate_msa, _, _, gate_mlp = block_modulation(block, self._t_mlp_of_next_step(rows, attn))
        contribution = gate_tokens(gate_msa, attn) + cross
        self.state.put(index, "folded", contribution + gate_tokens(gate_mlp, mlp))
        kind = "temporal" if block.temporal else "spatial"
        if self.plans[self.step + 1].action(kind, "mlp") is Action.PARTIAL:
            idx, pad = self._select(index, x, T, S, step=self.step + 1)
            self.state.put(index, "folded_idx", idx)
            if pad is not None:
                self.state.put(index, "folded_pad", pad)
            self.state.put(index, "folded_rows", sel.gather_tokens(contribution, idx))

    def _run_folded(self, index, block, x, t, x_mask, t0, S, acts) -> torch.Tensor:
        out = x + self.state.get(index, "folded")
        idx = self.state.get(index, "folded_idx")
        if idx is not None:
            _, _, _, shift_mlp, scale_mlp, gate_mlp = block_modulation(block, t, x_mask, t0)
            rows = sel.gather_tokens(x, idx) + self.state.get(index, "folded_rows")
            h = block.norm2(rows) * (1 + rows_param(scale_mlp, idx, S)) + rows_param(shift_mlp, idx, S)
            pad = self.state.get(index, "folded_pad")
            write_rows(out, idx, pad, rows + rows_param(gate_mlp, idx, S) * block.mlp(h))
        else:
            pad = None
        for name in ("folded", "folded_idx", "folded_rows", "folded_pad"):
            self.state.drop(index, name)
        if self.history:
            stats, n = self.history[-1], x.shape[0] * x.shape[1]
            for module in ("attn", "cross", "mlp"):
                done = count_rows(idx, pad) if module == "mlp" and idx is not None else 0
                stats["recomputed"][module] = stats["recomputed"].get(module, 0) + done
                stats["tokens"][module] = stats["tokens"].get(module, 0) + n
        return out
