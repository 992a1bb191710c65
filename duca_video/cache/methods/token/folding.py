"""Folding: one tensor per block instead of three, for a full step whose outputs have one conservative reader.

A full step at t computes attn, cross and mlp for every token. When the only later reader is the next step t',
a conservative one that reuses attn and cross whole and recomputes the MLP for a known set of rows (the random
draw depends only on (seed, step, block), so it is known now), then t' needs only
    folded = gate_msa(t') * attn + cross + gate_mlp(t') * mlp              (every token)
    rows   = (gate_msa(t') * attn + cross)[selected]                       (the recomputed tokens)
and the block output at t' is x + folded, with the selected rows replaced by rows + x + gate_mlp(t') * MLP(...).
gate(t') comes from the model's own timestep path (t_embedder, fps_embedder, t_block) at the next timestep.
`Folder` is made once per cached model (when the method allows folding) and is told the sample in each call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from duca_video.models.layers import sinusoid
from duca_video.models.stdit3 import block_modulation, gate_tokens

from ...compile import keep_out_of_tracing
from ...config import CacheConfig
from ...policy import Sample
from ...records import StepKind
from ...schedule import Action
from . import selection as sel

FOLDED = ("folded", "folded_idx", "folded_rows", "folded_pad")  # what a folded block keeps in the store


def rows_param(p: torch.Tensor, idx: torch.Tensor, S: int) -> torch.Tensor:
    """A (B, Tm, 1, C) modulation tensor for the tokens idx (B, k): per frame when Tm > 1."""
    if p.shape[1] == 1:
        return p[:, 0]
    return p[:, :, 0].gather(1, (idx // S)[..., None].expand(-1, -1, p.shape[-1]))


def write_rows(cache: torch.Tensor, idx: torch.Tensor, pad: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Write recomputed rows into `cache` in place; padded entries (sequence parallel) change nothing.

    A padded entry repeats its row's first index (token 0 for a row with none of its own: `to_local`), so it
    writes that entry's new value again, or the cache's own value for an empty row: duplicate writes agree, and
    the shapes never depend on the values (no boolean indexing: no device sync, and it runs on meta tensors)."""
    if pad is not None:
        first = torch.where(pad[:, :1, None], sel.gather_tokens(cache, idx[:, :1]).to(rows.dtype), rows[:, :1])
        rows = torch.where(pad[..., None], first, rows)
    return sel.scatter_tokens_(cache, idx, rows)


def count_rows(idx: torch.Tensor, pad: torch.Tensor | None) -> int:
    return idx.numel() - (0 if pad is None else int(pad.sum()))


class Folder:
    """Folding for one cached model: decides when a full step may fold, stores the folded tensor and runs the
    block from it at the reading step."""

    def __init__(self, config: CacheConfig, model: nn.Module) -> None:
        self.config = config
        self.model = model
        self.fps_emb: torch.Tensor | None = None  # this forward's fps embedding (the next step's modulation needs it)

    @staticmethod
    def possible(model: nn.Module, config: CacheConfig) -> bool:
        """The model exposes its timestep path and the method's schedule may fold (a token method)."""
        has_path = all(hasattr(model, a) for a in ("fps_embedder", "t_embedder", "t_block"))
        return has_path and config.fold_ok and getattr(config, "selector", None) is not None

    def install(self) -> Any:
        """The hook that keeps the fps embedding of each forward; returns its handle."""
        return self.model.fps_embedder.register_forward_hook(keep_out_of_tracing(self._keep_fps_embedding))

    def _keep_fps_embedding(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        self.fps_emb = output

    def can_fold(self, sample: Sample, kind: str) -> bool:
        """This full step's attn/mlp outputs are read by exactly one later step, a conservative one that
        reuses attn and cross whole: then only their gated sum (and the rows it recomputes) is needed."""
        cfg, s = self.config, sample.step
        if self.fps_emb is None or s + 1 >= len(sample.plans):
            return False
        cur, nxt = sample.plan.actions[kind], sample.plans[s + 1]
        after = nxt.actions[kind]
        return (
            nxt.kind is StepKind.MODULE_REUSE
            and cur["attn"] is Action.COMPUTE
            and cur["mlp"] is Action.COMPUTE
            and after["attn"] is Action.REUSE
            and after["cross"] is Action.REUSE
            and after["mlp"] in (Action.REUSE, Action.PARTIAL)
            and not {"attn", "mlp"} & nxt.keep[kind]
            and cfg.selector not in ("min_similarity", "max_similarity")  # these look at the next step's input
            and cfg.age_bonus == 0
        )

    def _t_mlp_of_next_step(self, sample: Sample, rows: int, like: torch.Tensor) -> torch.Tensor:
        """The model's t_block output at the next step's timestep: the same ops the model will run then."""
        step = sample.step + 1
        if sample.tokens.next_t_mlp is None or sample.tokens.next_t_mlp[0] != step:
            embedder = self.model.t_embedder
            t = torch.full((rows,), sample.timesteps[step], device=like.device).to(like.dtype)
            freq = sinusoid(t, embedder.frequency_embedding_size).to(like.dtype)
            sample.tokens.next_t_mlp = (step, self.model.t_block(embedder.mlp(freq) + self.fps_emb))
        return sample.tokens.next_t_mlp[1]

    def store_folded(self, sample: Sample, selector: Any, index: int, block: nn.Module, outputs, T, S, x) -> None:
        """Keep the gated sum of this step's (attn, cross, mlp) for the next step, and the rows it recomputes."""
        attn, cross, mlp = outputs
        store = sample.store
        _, _, gate_msa, _, _, gate_mlp = block_modulation(block, self._t_mlp_of_next_step(sample, x.shape[0], attn))
        contribution = gate_tokens(gate_msa, attn) + cross
        store.put(index, "folded", contribution + gate_tokens(gate_mlp, mlp))
        kind = "temporal" if block.temporal else "spatial"
        if sample.plans[sample.step + 1].action(kind, "mlp") is Action.PARTIAL:
            idx, pad = selector.select(sample, index, x, T, S, step=sample.step + 1)
            store.put(index, "folded_idx", idx)
            if pad is not None:
                store.put(index, "folded_pad", pad)
            store.put(index, "folded_rows", sel.gather_tokens(contribution, idx))

    def run_folded(self, sample: Sample, index: int, block: nn.Module, x, t, x_mask, t0, S) -> torch.Tensor:
        """The block at the step that reads the folded tensor: x + folded, the selected rows' MLP recomputed."""
        store = sample.store
        out = x + store.get(index, "folded")
        idx, pad = store.get(index, "folded_idx"), store.get(index, "folded_pad")
        if idx is not None:
            _, _, _, shift_mlp, scale_mlp, gate_mlp = block_modulation(block, t, x_mask, t0)
            rows = sel.gather_tokens(x, idx) + store.get(index, "folded_rows")
            h = block.norm2(rows) * (1 + rows_param(scale_mlp, idx, S)) + rows_param(shift_mlp, idx, S)
            write_rows(out, idx, pad, rows + rows_param(gate_mlp, idx, S) * block.mlp(h))
        for name in FOLDED:
            store.drop(index, name)
        if sample.history:
            stats, n = sample.history[-1], x.shape[0] * x.shape[1]
            for module in ("attn", "cross", "mlp"):
                done = count_rows(idx, pad) if module == "mlp" and idx is not None else 0
                stats["recomputed"][module] = stats["recomputed"].get(module, 0) + done
                stats["tokens"][module] = stats["tokens"].get(module, 0) + n
        return out
