"""Token selection for conservative steps: the scores a full step keeps, and the draw at the step that uses them.

A mixin of CacheController (uses its config, state, plans, blocks, step, seeds, cfg and sp). Under sequence
parallelism the choice is made over the whole grid, identically on every rank, and each rank keeps its own share.

The random selectors (`random`, `random_frame`) depend on (video seed, step, block) only, so the whole sample's
choice is known once the token grid is: at the sample's first forward every (step, block) that recomputes tokens
is drawn on the CPU, exactly as a step would draw it, and the lot is copied to the device in one transfer (from
pinned memory, not blocking, on CUDA). A step then only slices that tensor: no host-device copy, no sync. The
score-based selectors (k_norm, v_norm, cross_entropy, min/max_similarity) and `age_bonus` > 0 depend on the
step's data, so they still choose at the step itself, on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from duca_video.parallel.sequence import layout_of

from ...schedule import Action
from . import selection as sel
from .folding import count_rows

PREDRAWN_SELECTORS = ("random", "random_frame")


@dataclass
class DrawnSelection:
    """Every pre-drawn selection of one sample in one device tensor: the indices of all entries, then their
    padding masks (as 0/1) under sequence parallelism; `where` says where each (step, block) entry lies."""

    flat: torch.Tensor  # int64, on the model's device
    where: dict[tuple[int, int], tuple[int, int, int, int | None, int]]  # key -> offset, rows, width, pad, count

    def get(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
        if key not in self.where:
            return None
        offset, rows, width, pad_at, count = self.where[key]
        idx = self.flat[offset : offset + rows * width].view(rows, width)
        pad = None if pad_at is None else self.flat[pad_at : pad_at + rows * width].view(rows, width).bool()
        return idx, pad, count

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


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
        sp = self._layout if self._layout is not None else layout_of(self.model)
        return sp if sp is not None and sp.size > 1 else None

    predraw = True  # False: draw at each step (the behaviour before pre-drawing; the tests' reference)

    @property
    def _drawn(self) -> DrawnSelection | None:
        return self.sample.tokens.drawn if self.sample is not None else None

    def _can_predraw(self) -> bool:
        cfg = self.config
        return (
            self.predraw
            and getattr(cfg, "selector", None) in PREDRAWN_SELECTORS
            and cfg.age_bonus == 0  # the age term makes each choice depend on the previous ones, held on the device
        )

    def _predraw(self, x: torch.Tensor, T: int) -> None:
        """At the sample's first forward: draw every (step, block) selection the schedule will read, copy once."""
        self.sample.tokens.drawn = None
        if self.plans is None or not self._can_predraw():
            return
        rows = x.shape[0]
        n = T * self.sp.s_global if self.sp else x.shape[1]
        chunks, pads, where, offset = [], [], {}, 0
        for step, plan in enumerate(self.plans):
            for index, block in enumerate(self.blocks):
                if plan.kind == "aggressive" or Action.PARTIAL not in plan.actions[self._kind(block)].values():
                    continue
                idx, pad = self._draw_on_cpu(index, rows, T, n, step)
                pad_at = None
                if pad is not None:  # only under sequence parallelism; placed after all the indices below
                    pad_at = sum(p.numel() for p in pads)
                    pads.append(pad.to(idx.dtype).reshape(-1))
                where[(step, index)] = (offset, *idx.shape, pad_at, count_rows(idx, pad))
                chunks.append(idx.reshape(-1))
                offset += idx.numel()
        if not chunks:
            return
        for key, (at, r, w, pad_at, count) in where.items():
            if pad_at is not None:
                where[key] = (at, r, w, offset + pad_at, count)
        host = torch.cat(chunks + pads)
        if x.device.type == "cuda":  # pinned memory lets the one copy run without blocking the host
            self.sample.tokens.drawn = DrawnSelection(host.pin_memory().to(x.device, non_blocking=True), where)
        else:
            self.sample.tokens.drawn = DrawnSelection(host.to(x.device), where)

    @staticmethod
    def _kind(block: nn.Module) -> str:
        return "temporal" if block.temporal else "spatial"

    def _draw_on_cpu(
        self, index: int, rows: int, T: int, n: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A random selector's choice for (step, block) on the CPU: indices (rows, k) and padding under SP."""
        cfg = self.config
        draw = (self.seeds, step, index)
        if cfg.selector == "random":
            scores = sel.random_scores(rows, n, self.cfg, *draw)
        else:
            scores = sel.random_frame_scores(rows, T, n // T, self.cfg, *draw)
        idx = sel.top_k(scores, round(cfg.recompute_ratio * n))
        return self.sp.to_local(idx, T) if self.sp else (idx, None)

    def _rows_picked(self, idx: torch.Tensor, pad: torch.Tensor | None) -> int:
        """Tokens recomputed with `idx` (for the summary): known on the host for pre-drawn ones, no device read."""
        picked = self.sample.tokens.picked
        if picked is not None and picked[0] is idx:
            return picked[1]
        return count_rows(idx, pad)

    def _select(
        self, index: int, x: torch.Tensor, T: int, S: int, step: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens to recompute at `step` (default: the current one): (indices (B, k), padding mask or None).

        The draw depends on (video seed, step, block) only. Under sequence parallelism the scores cover the whole
        grid, identical on every rank, and each rank keeps its share: the same choice as one process. Random
        selectors read the sample's pre-drawn choice (`_predraw`); the code below is the draw at the step."""
        drawn = None if self._drawn is None else self._drawn.get((self.step if step is None else step, index))
        if drawn is not None:
            self.sample.tokens.picked = (drawn[0], drawn[2])
            return drawn[0], drawn[1]
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
                raise ValueError(
                    f"selector {cfg.selector!r} compares tokens across the whole grid at the step"
                    " itself; it is not supported with sequence parallelism, use another one"
                )
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
            self.state.put(index, "age", age)  # stored again after the in-place change (an offloaded cache needs it)
        idx, pad = sp.to_local(idx, T) if sp else (idx, None)
        return idx.to(x.device), None if pad is None else pad.to(x.device)
