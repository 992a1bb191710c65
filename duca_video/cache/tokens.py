"""Token selection for conservative steps: the scores a full step keeps, and the draw at the step that uses them.

A mixin of CacheController (uses its config, state, plans, step, seeds, cfg and sp). Under sequence parallelism
the choice is made over the whole grid, identically on every rank, and each rank keeps its own share.
"""

from __future__ import annotations

import torch
from torch import nn

from . import selection as sel


class SelectionMixin:
    def _store_scores(self, index, block, grabbed, mask, T, S) -> None:
        cfg = self.config
        if cfg.selector in ("k_norm", "v_norm"):
            qkv = grabbed["qkv"]  # (B*T, S, 3C) spatial or (B*S, T, 3C) temporal
            c = qkv.shape[-1] // 3
            part = qkv[..., c : 2 * c] if cfg.selector == "k_norm" else qkv[..., 2 * c :]
            scores = sel.norm_scores(part)
            if block.temporal:
                scores = scores.view(-1, S, T).transpose(1, 2)
            scores = scores.reshape(-1, T * S)
        else:
            q, kv = grabbed["q"], grabbed["kv"]  # q (B, N, C); kv (B, L, 2C), or upstream's packed (1, sum L, 2C)
            c = q.shape[-1]
            keys, key_mask = kv[..., :c], mask
            if isinstance(mask, (list, tuple)):  # upstream passes the valid text lengths instead of a mask
                keys = nn.utils.rnn.pad_sequence(list(keys.reshape(-1, c).split(list(mask))), batch_first=True)
                lengths = torch.tensor(list(mask), device=keys.device)
                key_mask = torch.arange(keys.shape[1], device=keys.device)[None] < lengths[:, None]
            elif key_mask is not None:
                key_mask = key_mask.bool()
            scores = sel.attention_entropy(q, keys, key_mask, getattr(block.cross_attn, "num_heads", 1))
        scores = scores.float()
        if self.sp:  # selection looks at the whole grid: every rank gets every token's score
            scores = self.sp.gather_scores(scores, T)
        self.state.put(index, "scores", scores)

    @property
    def sp(self):
        sp = self._layout if self._layout is not None else getattr(self.model, "sp", None)
        return sp if sp is not None and sp.size > 1 else None

    def _select(
        self, index: int, x: torch.Tensor, T: int, S: int, step: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens to recompute at `step` (default: the current one): (indices (B, k), padding mask or None).

        The draw depends on (video seed, step, block) only. Under sequence parallelism the scores cover the whole
        grid, identical on every rank, and each rank keeps its share: the same choice as one process."""
        cfg, sp = self.config, self.sp
        rows = x.shape[0]
        n = T * sp.s_global if sp else x.shape[1]
        k = round(cfg.recompute_ratio * n)
        draw = (self.seeds, self.step if step is None else step, index)
        if cfg.selector == "random":
            scores = sel.random_scores(rows, n, self.cfg, *draw)
        elif cfg.selector == "random_frame":
            scores = sel.random_frame_scores(rows, T, n // T, self.cfg, *draw)
        elif cfg.selector in ("min_similarity", "max_similarity"):
            if sp:
                raise ValueError(f"selector {cfg.selector!r} compares tokens across the whole grid at the step"
                                 " itself; it is not supported with sequence parallelism, use another one")  # fmt: skip
            gens = sel.row_generators(*draw, rows, self.cfg)
            scores = sel.similarity_scores(x, 0.01, cfg.selector == "min_similarity", gens)
        else:
            scores = self.state.get(index, "scores")
            if scores is None:
                raise RuntimeError(f"cache: selector {cfg.selector!r} has no scores for block {index}")
        # On the meta device (counting runs) the choice is made on the CPU, where the random draws are; scores
        # computed from meta tensors have no values, and which tokens are picked does not change the cost.
        scores = torch.zeros(scores.shape) if scores.is_meta else scores.to("cpu" if x.is_meta else x.device)
        if cfg.age_bonus > 0:
            age = self.state.get(index, "age")
            if age is None:
                age = self.state.put(index, "age", torch.zeros(rows, n, device=scores.device))
            scores = scores + cfg.age_bonus * age
        idx = sel.top_k(scores, k)
        if cfg.age_bonus > 0:
            age += 1
            age.scatter_(1, idx, 0.0)
        idx, pad = sp.to_local(idx, T) if sp else (idx, None)
        return idx.to(x.device), None if pad is None else pad.to(x.device)
