"""First-Block Cache (ParaAttention's dynamic cache, also in diffusers): block 0 runs every step; when its
residual has barely changed since the last computed step, the remaining blocks are skipped.

On a step, block 0 (the first spatial block) turns the stack input x into out0. Its residual r0 = out0 - x is
compared with r0 of the last *computed* step: rel = mean|r0 - r0_prev| / mean|r0_prev| over the whole token grid
(both CFG halves, every video of the batch; summed over the SP group, padding excluded, so every rank takes the
same decision). rel < `threshold` skips the other blocks: the stack output is out0 + R, where R = final - out0 is
the remaining blocks' residual of the last computed step. Otherwise every block runs and r0_prev, R refresh.
The first `warmup_steps` steps (at least step 0, which has nothing to compare with) and, with `compute_last`,
the last step always run; `max_skips` > 0 bounds the run of consecutive skipped steps.

Memory: two stack-sized tensors (r0_prev and R), held only while a later step may still skip. R is taken as
(final - x) - r0, which equals final - out0 up to rounding, so out0 itself is never held across the stack.
Each video decides on its own rows (both CFG halves), so its result does not depend on the batch it is in: on a
step where some videos skip, only the computing videos' rows run the blocks after block 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import CacheConfig, check_field
from ..policy import CachePolicy, Sample, refresh_rows
from ..schedule import StepPlan, full_schedule
from ..state import STACK
from .teacache import per_video_relative_l1, relative_l1

FIRST_RESIDUAL = "first_residual"  # r0 of the last computed step
REST_RESIDUAL = "rest_residual"  # final - out0 of the last computed step


@dataclass
class FirstBlockCacheConfig(CacheConfig):
    """First-Block Cache: run block 0 every step; skip the remaining blocks (out0 + their last residual) while
    the relative L1 change of block 0's residual since the last computed step is below `threshold`. The first
    `warmup_steps` steps and (compute_last) the last step always run; max_skips > 0 caps consecutive skips."""

    method: ClassVar[str] = "fbcache"
    data_dependent: ClassVar[bool] = True
    threshold: float = 0.05  # diffusers' FirstBlockCacheConfig default
    warmup_steps: int = 1
    compute_last: bool = True
    max_skips: int = 0  # 0: no limit

    def validate(self) -> None:
        check_field(self.threshold >= 0, self.method, "threshold", "a number >= 0", self.threshold)
        check_field(
            self.warmup_steps >= 1,
            self.method,
            "warmup_steps",
            "an int >= 1 (step 0 has no earlier step to compare with)",
            self.warmup_steps,
        )
        check_field(self.max_skips >= 0, self.method, "max_skips", "an int >= 0 (0 = no limit)", self.max_skips)

    def make_policy(self, sample: Sample) -> FirstBlockCachePolicy:
        return FirstBlockCachePolicy(self, sample)


class FirstBlockCachePolicy(CachePolicy):
    def __init__(self, config: FirstBlockCacheConfig, sample: Sample) -> None:
        super().__init__(config, sample)
        self.skipped_in_a_row = [0] * sample.videos  # per video

    def plan(self) -> list[StepPlan]:
        # Every step is planned full; a skip is decided after block 0 (history kind "first_block").
        return full_schedule(len(self.sample.timesteps))

    def forced(self, step: int) -> bool:
        """Whether `step` computes every block whatever the signal says."""
        cfg = self.config
        return step < cfg.warmup_steps or (cfg.compute_last and step == len(self.sample.timesteps) - 1)

    def residuals_needed(self) -> bool:
        """Whether a later step may skip, i.e. read the residuals this step would store."""
        return any(not self.forced(s) for s in range(self.sample.step + 1, len(self.sample.timesteps)))

    def compute_stack(self, block: nn.Module, x: torch.Tensor, t: torch.Tensor) -> bool:
        return True  # block 0 always runs; the choice comes after it

    def after_first_block(self, stack_in: torch.Tensor, out: torch.Tensor) -> list[bool]:
        sample, cfg = self.sample, self.config
        current = out - stack_in
        previous = self.store.get(STACK, FIRST_RESIDUAL)
        go_on = [True] * sample.videos
        if previous is not None and not self.forced(sample.step):
            if sample.per_video:  # each video on its own rows: its decision does not depend on its batch
                rel = per_video_relative_l1(current, previous, sample, stack_in, "fbcache_signal")
            else:  # upstream's packed captions: one signal for the batch
                rel = [
                    relative_l1(current, previous, sample.layout, stack_in, "fbcache_signal", sample.row_group)
                ] * sample.videos
            if sample.history:  # what the threshold was compared with, for choosing one
                sample.history[-1]["signal"] = rel  # one per video
            for v, r in enumerate(rel):
                capped = cfg.max_skips > 0 and self.skipped_in_a_row[v] >= cfg.max_skips
                go_on[v] = capped or not r < cfg.threshold
        for v, computes in enumerate(go_on):
            self.skipped_in_a_row[v] = 0 if computes else self.skipped_in_a_row[v] + 1
        if not self.residuals_needed():
            self.store.drop(STACK, FIRST_RESIDUAL)
        elif any(go_on):  # the computing videos' r0 (the others keep their last computed step's)
            rows = None if all(go_on) else sample.rows_of([v for v, c in enumerate(go_on) if c])
            refresh_rows(
                self.store, FIRST_RESIDUAL, current, None if rows is None else torch.tensor(rows, device=current.device)
            )
        return go_on

    def reuse_stack(self, stack_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # `x` is this step's out0: the blocks after block 0 passed it through untouched.
        return x + self.store.get(STACK, REST_RESIDUAL)

    def update_stack(self, stack_in: torch.Tensor, out: torch.Tensor) -> None:
        if not self.residuals_needed():
            self.store.drop(STACK, REST_RESIDUAL)
            self.store.drop(STACK, FIRST_RESIDUAL)
            return
        first = self.store.get(STACK, FIRST_RESIDUAL)
        rest = out - stack_in
        if first is not None:
            rest = rest - first
        # else: a FLOP replay on meta, which takes the decisions from the recorded kinds and never calls
        # after_first_block; the values are never read there, only the shapes and the work.
        refresh_rows(self.store, REST_RESIDUAL, rest, self.sample.now.compute_rows)


METHODS = (FirstBlockCacheConfig,)
