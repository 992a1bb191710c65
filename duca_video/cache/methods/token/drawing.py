"""Token selection for conservative steps: the scores a full step keeps, and the draw at the step that uses them.

`Selector` is made once per cached model (by the controller, for a method with a selector) and is told the sample
in each call: what it reads of it is the schedule (`plans`, `step`), the videos' seeds, whether the batch holds
both CFG halves, the sequence-parallel layout, the store (scores, ages) and the family's scratch
(`sample.tokens`). Under sequence parallelism the choice is made over the whole grid, identically on every rank,
and each rank keeps its own share.

The random selectors (`random`, `random_frame`) depend on (video seed, step, block) only, so the whole sample's
choice is known once the token grid is: at the sample's first forward every (step, block) that recomputes tokens
is drawn on the CPU, exactly as a step would draw it, and the lot is copied to the device in one transfer (from
pinned memory, not blocking, on CUDA). A step then only slices that tensor: no host-device copy, no sync. The
score-based selectors (k_norm, v_norm, cross_entropy, min/max_similarity) and `age_bonus` > 0 depend on the
step's data, so they still choose at the step itself, on the device.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import SCORED_SELECTORS, CacheConfig
from ...policy import Sample
from ...schedule import Action, StepPlan
from . import selection as sel
from .folding import count_rows

# The projections whose outputs a selector reads (by Open-Sora's attribute names, ours and upstream's alike).
_CAPTURED = (("attn", "qkv", "qkv"), ("cross_attn", "q_linear", "q"), ("cross_attn", "kv_linear", "kv"))

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


class Selector:
    """Chooses the tokens a partial recompute refreshes, for one cached model's method (`config.selector`)."""

    predraw = True  # False: draw at each step (the behaviour before pre-drawing; the tests' reference)

    def __init__(self, config: CacheConfig, blocks: list[nn.Module]) -> None:
        self.config = config
        self.kinds = ["temporal" if block.temporal else "spatial" for block in blocks]
        self._grab: dict[str, torch.Tensor] | None = None  # where the capture hooks write, while a step captures
        self._grab_keys: tuple[str, ...] = ()

    # -- scores a full step captures for later conservative steps -------------------------------------------
    def install(self, blocks: list[nn.Module]) -> list[Any]:
        """Forward hooks, registered once (not per call: a compiled module would recompile), that keep a
        projection's output while a full step computes it anyway, for a scored selector. They store only inside
        `capturing`; an unscored selector needs none."""
        if self.config.selector not in SCORED_SELECTORS:
            return []
        handles = []
        for block in blocks:
            for parent, name, key in _CAPTURED:
                module = getattr(getattr(block, parent), name)
                handles.append(module.register_forward_hook(functools.partial(self._grab_output, key)))
        return handles

    def _grab_output(self, key: str, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if self._grab is not None and key in self._grab_keys:
            self._grab[key] = output

    @contextmanager
    def capturing(self, sink: dict[str, torch.Tensor], *keys: str) -> Iterator[None]:
        self._grab, self._grab_keys = sink, keys
        try:
            yield
        finally:
            self._grab, self._grab_keys = None, ()

    def needs_scores(self, plan: StepPlan, kind: str) -> str | None:
        """Which statistic this step must capture for later conservative steps: "qkv", "cross" or None."""
        selector = self.config.selector
        if not self.config.recompute:
            return None
        if selector in ("k_norm", "v_norm") and plan.action(kind, "attn") is Action.COMPUTE:
            return "qkv"
        if selector == "cross_entropy" and plan.action(kind, "cross") is Action.COMPUTE:
            return "cross"
        return None

    def store_scores(self, sample: Sample, index: int, block: nn.Module, grabbed, mask, T: int, S: int) -> None:
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
        sp = _sp(sample)
        if sp:  # selection looks at the whole grid: every rank gets every token's score
            scores = sp.gather_scores(scores, T)
        sample.store.put(index, "scores", scores)

    # -- the draw ----------------------------------------------------------------------------------------------
    def _can_predraw(self) -> bool:
        cfg = self.config
        return (
            self.predraw
            and cfg.selector in PREDRAWN_SELECTORS
            and cfg.age_bonus == 0  # the age term makes each choice depend on the previous ones, held on the device
        )

    def predraw_sample(self, sample: Sample, x: torch.Tensor, T: int) -> None:
        """At the sample's first forward: draw every (step, block) selection the schedule will read, copy once."""
        sample.tokens.drawn = None
        if not sample.plans or not self._can_predraw():
            return
        sp = _sp(sample)
        rows = x.shape[0]
        n = T * sp.s_global if sp else x.shape[1]
        chunks, pads, where, offset = [], [], {}, 0
        for step, plan in enumerate(sample.plans):
            for index, kind in enumerate(self.kinds):
                if plan.skips_stack or Action.PARTIAL not in plan.actions[kind].values():
                    continue
                idx, pad = self._draw_on_cpu(sample, index, rows, T, n, step)
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
            sample.tokens.drawn = DrawnSelection(host.pin_memory().to(x.device, non_blocking=True), where)
        else:
            sample.tokens.drawn = DrawnSelection(host.to(x.device), where)

    def _draw_on_cpu(
        self, sample: Sample, index: int, rows: int, T: int, n: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A random selector's choice for (step, block) on the CPU: indices (rows, k) and padding under SP."""
        cfg, sp = self.config, _sp(sample)
        draw = (sample.seeds, step, index)
        if cfg.selector == "random":
            scores = sel.random_scores(rows, n, sample.cfg, *draw)
        else:
            scores = sel.random_frame_scores(rows, T, n // T, sample.cfg, *draw)
        idx = sel.top_k(scores, round(cfg.recompute_ratio * n))
        return sp.to_local(idx, T) if sp else (idx, None)

    def rows_picked(self, sample: Sample, idx: torch.Tensor, pad: torch.Tensor | None) -> int:
        """Tokens recomputed with `idx` (for the summary): known on the host for pre-drawn ones, no device read."""
        picked = sample.tokens.picked
        if picked is not None and picked[0] is idx:
            return picked[1]
        return count_rows(idx, pad)

    def select(
        self, sample: Sample, index: int, x: torch.Tensor, T: int, S: int, step: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens to recompute at `step` (default: the current one): (indices (B, k), padding mask or None).

        The draw depends on (video seed, step, block) only. Under sequence parallelism the scores cover the whole
        grid, identical on every rank, and each rank keeps its share: the same choice as one process. Random
        selectors read the sample's pre-drawn choice (`predraw_sample`); the code below is the draw at the step."""
        step = sample.step if step is None else step
        drawn = None if sample.tokens.drawn is None else sample.tokens.drawn.get((step, index))
        if drawn is not None:
            sample.tokens.picked = (drawn[0], drawn[2])
            return drawn[0], drawn[1]
        cfg, sp = self.config, _sp(sample)
        rows = x.shape[0]
        n = T * sp.s_global if sp else x.shape[1]
        scores = self._scores_at_step(sample, index, x, rows, T, n, step)
        scores = scores.to(x.device)  # (on the meta device of a FLOP replay the choice has a shape, no values)
        if cfg.age_bonus > 0:
            age = sample.store.get(index, "age")
            if age is None:
                age = sample.store.put(index, "age", torch.zeros(rows, n, device=scores.device))
            scores = scores + cfg.age_bonus * age
        idx = sel.top_k(scores, round(cfg.recompute_ratio * n))
        if cfg.age_bonus > 0:
            age += 1
            age.scatter_(1, idx, 0.0)
            sample.store.put(index, "age", age)  # stored again after the in-place change (an offloaded cache needs it)
        idx, pad = sp.to_local(idx, T) if sp else (idx, None)
        return idx.to(x.device), None if pad is None else pad.to(x.device)

    def _scores_at_step(
        self, sample: Sample, index: int, x: torch.Tensor, rows: int, T: int, n: int, step: int
    ) -> torch.Tensor:
        cfg = self.config
        draw = (sample.seeds, step, index)
        if cfg.selector == "random":
            return sel.random_scores(rows, n, sample.cfg, *draw)
        if cfg.selector == "random_frame":
            return sel.random_frame_scores(rows, T, n // T, sample.cfg, *draw)
        if cfg.selector in ("min_similarity", "max_similarity"):
            if _sp(sample):
                raise ValueError(
                    f"selector {cfg.selector!r} compares tokens across the whole grid at the step"
                    " itself; it is not supported with sequence parallelism, use another one"
                )
            gens = sel.row_generators(*draw, rows, sample.cfg)
            return sel.similarity_scores(x, 0.01, cfg.selector == "min_similarity", gens)
        scores = sample.store.get(index, "scores")
        if scores is None:
            raise RuntimeError(f"cache: selector {cfg.selector!r} has no scores for block {index}")
        return scores


def _sp(sample: Sample) -> Any:
    """The sample's sequence-parallel layout when it splits the tokens over more than one rank, else None."""
    layout = sample.layout
    return layout if layout is not None and layout.size > 1 else None
