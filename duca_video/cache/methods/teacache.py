"""TeaCache: skip the block stack while the accumulated, rescaled relative L1 change of the first block's
modulated input stays under a threshold; a skipped step adds the stack residual of the last computed step.

Each video decides on its own rows (both CFG halves): on a step where some videos compute and others skip, only
the computing videos' rows run the stack, so a video's result does not depend on the batch it is in. The
default polynomial is the one the TeaCache authors fitted for Open-Sora 1.2 (their experiment file; highest
power first); 0.1 is their "slow" setting, 0.2 "fast". The first and last steps always run. Under sequence
parallelism (and CFG parallelism) the signal is summed over the group, so every rank takes the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...models.stdit3 import block_modulation, modulate_tokens
from ...parallel.comm import CommStats, all_reduce_sum
from ..config import CacheConfig, check_field
from ..policy import ResidualStackPolicy, Sample
from ..schedule import StepPlan, full_schedule
from ..state import STACK

OPEN_SORA_12_COEFFICIENTS = (2.17546007e02, -1.18329252e02, 2.68662585e01, -4.59364272e-02, 4.84426240e-02)


@dataclass
class TeaCacheConfig(CacheConfig):
    """TeaCache: skip the block stack (add the previous residual) while the accumulated rescaled relative L1
    change of the first block's modulated input stays under `threshold`; first and last steps always run."""

    method: ClassVar[str] = "teacache"
    data_dependent: ClassVar[bool] = True
    threshold: float = 0.1
    coefficients: tuple[float, ...] = OPEN_SORA_12_COEFFICIENTS

    def validate(self) -> None:
        check_field(self.threshold >= 0, self.method, "threshold", "a number >= 0", self.threshold)
        self.coefficients = tuple(float(c) for c in self.coefficients)
        check_field(
            len(self.coefficients) >= 1, self.method, "coefficients", "a non-empty polynomial", self.coefficients
        )

    def unseen_bytes(self, rows: int, tokens: int, hidden: int, itemsize: int) -> int | None:
        # Replayed as full on meta, every step stores the stack residual (as a computed step does); what a meta
        # run cannot store is the signal's state: the first block's modulated input, (rows, tokens, C).
        return rows * tokens * hidden * itemsize

    def make_policy(self, sample: Sample) -> TeaCachePolicy:
        return TeaCachePolicy(self, sample)


def _change_sums(current: torch.Tensor, previous: torch.Tensor, layout, x: torch.Tensor) -> torch.Tensor:
    """(2, rows) float64: per row, the sum of |current - previous| and of |previous| over this rank's real tokens
    (padding under sequence parallelism excluded)."""
    change, size = (current - previous).abs(), previous.abs()
    if layout is not None:
        valid = layout.local_valid(x.shape[1] // layout.s_local, x.device)[None, :, None]
        change, size = change * valid, size * valid
    return torch.stack([change.flatten(1).sum(1), size.flatten(1).sum(1)]).double()


def _over_groups(sums: torch.Tensor, layout, row_group, name: str) -> torch.Tensor:
    """The sums over the whole grid (the SP group) and both CFG halves (`row_group`, under CFG parallelism)."""
    if layout is not None:
        sums = all_reduce_sum(sums, layout.group, layout.stats, name)
    if row_group is not None:
        sums = all_reduce_sum(sums, row_group, layout.stats if layout is not None else CommStats(), name)
    return sums


def relative_l1(
    current: torch.Tensor, previous: torch.Tensor, layout, x: torch.Tensor, name: str, row_group=None
) -> float:
    """mean |current - previous| / mean |previous| over the whole token grid and the whole batch: the same number
    on every rank as on one process. One host read: the decision is host control flow."""
    sums = _over_groups(_change_sums(current, previous, layout, x).sum(1), layout, row_group, name)
    return float((sums[0] / sums[1]).item())


def per_video_relative_l1(
    current: torch.Tensor, previous: torch.Tensor, sample: Sample, x: torch.Tensor, name: str
) -> list[float]:
    """`relative_l1` for each video of the batch over its own rows (both CFG halves, the whole grid): what the
    video alone would measure, so its decisions do not depend on the batch it is in."""
    sums = _change_sums(current, previous, sample.layout, x)  # (2, rows)
    if sample.cfg:  # rows v and v + videos are one video's two halves
        sums = sums.view(2, 2, -1).sum(1)
    sums = _over_groups(sums, sample.layout, sample.row_group, name)
    return (sums[0] / sums[1]).tolist()


class TeaCachePolicy(ResidualStackPolicy):
    def __init__(self, config: TeaCacheConfig, sample: Sample) -> None:
        super().__init__(config, sample)
        self.accumulated = [0.0] * sample.videos  # one accumulator per video

    def plan(self) -> list[StepPlan]:
        return full_schedule(len(self.sample.timesteps))

    def residual_needed(self) -> bool:
        return not self.sample.last_step

    def compute_stack(self, block: nn.Module, x: torch.Tensor, t: torch.Tensor) -> list[bool]:
        sample = self.sample
        shift, scale = block_modulation(block, t)[:2]
        current = modulate_tokens(block.norm1(x), shift, scale)
        previous = self.store.get(STACK, "modulated_input")
        compute = [True] * sample.videos
        if sample.step > 0 and not sample.last_step and previous is not None:
            if sample.per_video:
                rel = per_video_relative_l1(current, previous, sample, x, "teacache_signal")
            else:  # upstream's packed captions: one signal for the whole batch, as TeaCache's own code
                rel = [relative_l1(current, previous, sample.layout, x, "teacache_signal", sample.row_group)]
                rel = rel * sample.videos
            coeffs = self.config.coefficients
            for v, r in enumerate(rel):
                self.accumulated[v] += sum(c * r ** (len(coeffs) - 1 - i) for i, c in enumerate(coeffs))
                compute[v] = self.accumulated[v] >= self.config.threshold
        for v, computed in enumerate(compute):
            if computed:
                self.accumulated[v] = 0.0
        if sample.last_step:
            self.store.drop(STACK, "modulated_input")
        else:
            self.store.put(STACK, "modulated_input", current)
        return compute


METHODS = (TeaCacheConfig,)
