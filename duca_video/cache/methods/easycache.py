"""EasyCache (Zhou et al., 2025): skip the block stack while a runtime estimate of the error stays small, with
no offline fit.

The estimate is the stack's *transformation rate*, measured at run time between the last two computed steps,

    k = mean |out_s - out_r| / mean |in_s - in_r|        (s, r: the last two computed steps)

which says how much the stack's output moves per unit of input change. On a later step t the output change is
predicted as k * mean |in_t - in_{t-1}| / mean |out_s| and accumulated; while the sum stays under `threshold`
the step reuses the stack, output = in_t + (out_s - in_s) (the last computed step's transformation), and a
computed step resets the sum. The first `warmup_steps` steps and the last step always compute, as do steps
before k is known (two computed steps). The authors measure the model's input latent and its prediction; here
the same quantities are the block stack's input and output tokens, which the engine caches (the patch embedding
before the stack and the final layer after it are computed on every step).

Each video decides on its own rows (both CFG halves), summed over the sequence-parallel group and the CFG pair,
so a video's result depends neither on its batch nor on the number of GPUs. 0.025 and 5 warm-up steps are the
authors' HunyuanVideo settings; Open-Sora 1.2 has no published setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import CacheConfig, check_field
from ..policy import ResidualStackPolicy, Sample, refresh_rows
from ..state import STACK
from .teacache import _over_groups

SLOTS = ("last_input", "last_output", "previous_input")  # stack-sized tensors held while a later step may skip


@dataclass
class EasyCacheConfig(CacheConfig):
    """EasyCache: skip the block stack while the accumulated predicted output change (runtime transformation rate
    x input change) stays under `threshold`; the first `warmup_steps` and the last step always compute."""

    method: ClassVar[str] = "easycache"
    data_dependent: ClassVar[bool] = True
    threshold: float = 0.025
    warmup_steps: int = 5

    def validate(self) -> None:
        check_field(self.threshold >= 0, self.method, "threshold", "a number >= 0", self.threshold)
        check_field(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 2,
            self.method,
            "warmup_steps",
            "int >= 2 (the transformation rate needs two computed steps)",
            self.warmup_steps,
        )

    def make_policy(self, sample: Sample) -> EasyCachePolicy:
        return EasyCachePolicy(self, sample)


def _video_sums(parts: list[torch.Tensor], sample: Sample, x: torch.Tensor, name: str) -> torch.Tensor:
    """(videos, parts): sum |part| over each video's rows (both CFG halves) and the whole token grid (summed over
    the SP group, padding left out), in one collective, left on the device. With upstream's packed captions (one
    decision per batch) every video gets the batch's sums."""
    layout = sample.layout
    valid = None if layout is None else layout.local_valid(x.shape[1] // layout.s_local, x.device)[None, :, None]
    sums = torch.stack([(p.abs() if valid is None else p.abs() * valid).flatten(1).sum(1) for p in parts]).double()
    if sample.cfg:  # rows v and v + videos are one video's two halves
        sums = sums.view(len(parts), 2, -1).sum(1)
    if not sample.per_video:
        sums = sums.sum(1, keepdim=True).expand(-1, sample.videos)
    return _over_groups(sums.contiguous(), layout, sample.row_group, name).T


class EasyCachePolicy(ResidualStackPolicy):
    def __init__(self, config: EasyCacheConfig, sample: Sample) -> None:
        super().__init__(config, sample)
        self.accumulated = [0.0] * sample.videos
        self.rate: list[float | None] = [None] * sample.videos  # k per video, once two steps computed
        # The last computed step's rate sums, read on the host only when a later step decides (a FLOP replay on
        # meta tensors, which decides nothing, never reads them; a GPU run reads them with that step's signal).
        self.pending: dict[int, torch.Tensor] = {}  # video -> the (videos, 2) sums of its last computed step

    def residual_needed(self) -> bool:
        return not self.sample.last_step

    def compute_stack(self, block: nn.Module, x: torch.Tensor, t: torch.Tensor) -> list[bool]:
        sample, store = self.sample, self.store
        compute = [True] * sample.videos
        previous = store.get(STACK, "previous_input")
        if sample.step >= self.config.warmup_steps and not sample.last_step and previous is not None:
            self._read_rates()
            # per video: [sum |in_t - in_t-1|, sum |out_s|] (both over the same tokens: their ratio is of means)
            sums = _video_sums([x - previous, store.get(STACK, "last_output")], sample, x, "easycache_signal").tolist()
            predicted = []
            for v, rate in enumerate(self.rate):
                moved, size = sums[v]
                if rate is None or size == 0:
                    predicted.append(None)
                    continue
                self.accumulated[v] += rate * moved / size
                predicted.append(self.accumulated[v])
                compute[v] = self.accumulated[v] >= self.config.threshold
            if sample.history:  # what the threshold was compared with, per video
                sample.history[-1]["signal"] = predicted
        for v, computed in enumerate(compute):
            if computed:
                self.accumulated[v] = 0.0
        if sample.last_step:
            store.drop(STACK, "previous_input")
        else:
            store.put(STACK, "previous_input", x)
        return compute

    def reuse_stack(self, stack_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return stack_in + (self.store.get(STACK, "last_output") - self.store.get(STACK, "last_input"))

    def update_stack(self, stack_in: torch.Tensor, out: torch.Tensor) -> None:
        sample, store = self.sample, self.store
        if not self.residual_needed():
            for slot in SLOTS:
                store.drop(STACK, slot)
            return
        last_in, last_out = store.get(STACK, "last_input"), store.get(STACK, "last_output")
        if last_in is not None:  # the rate between this computed step and the last one, for the videos computed
            sums = _video_sums([out - last_out, stack_in - last_in], sample, out, "easycache_rate")
            self.pending.update(dict.fromkeys(self._computed_videos(), sums))
        refresh_rows(store, "last_input", stack_in, sample.now.compute_rows)
        refresh_rows(store, "last_output", out, sample.now.compute_rows)

    def _read_rates(self) -> None:
        """k for every video with new sums: one host read per distinct tensor (usually one)."""
        read: dict[int, list[list[float]]] = {}
        for v, sums in self.pending.items():
            values = read.setdefault(id(sums), sums.tolist())
            moved_out, moved_in = values[v]
            if moved_in > 0:
                self.rate[v] = moved_out / moved_in
        self.pending.clear()

    def _computed_videos(self) -> list[int]:
        sample = self.sample
        if sample.now.compute_rows is None:
            return list(range(sample.videos))
        return sorted({r % sample.videos for r in sample.now.compute_list})


METHODS = (EasyCacheConfig,)
