"""Pyramid Attention Broadcast (VideoSys' Open-Sora defaults): inside a timestep window each attention output is
recomputed every `range` steps and broadcast (reused whole) in between; the MLP runs every step unless
mlp_range > 1. A static schedule over the timesteps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import CacheConfig, check_field
from ..policy import CachePolicy, Sample
from ..records import StepKind
from ..schedule import Action, StepPlan


@dataclass
class PABConfig(CacheConfig):
    """Pyramid Attention Broadcast (VideoSys' Open-Sora defaults): inside the timestep window
    (threshold[0] < t < threshold[1]) an attention output is recomputed only every `range` steps and
    broadcast (reused) in between; the MLP always runs unless mlp_range > 1."""

    method: ClassVar[str] = "pab"
    spatial_range: int = 2
    temporal_range: int = 4
    cross_range: int = 6
    mlp_range: int = 1
    threshold: tuple[float, float] = (450.0, 930.0)

    def validate(self) -> None:
        for name in ("spatial_range", "temporal_range", "cross_range", "mlp_range"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value >= 1, self.method, name, "int >= 1", value)
        self.threshold = tuple(float(v) for v in self.threshold)
        check_field(
            len(self.threshold) == 2 and self.threshold[0] < self.threshold[1],
            self.method,
            "threshold",
            "(low, high) timesteps with low < high",
            self.threshold,
        )

    def make_policy(self, sample: Sample) -> CachePolicy:
        return PABPolicy(self, sample)


def pab_schedule(config: PABConfig, timesteps: tuple[float, ...]) -> list[StepPlan]:
    lo, hi = config.threshold
    plans = []
    for s, t in enumerate(timesteps):
        in_window = lo < t < hi

        def act(period: int, s: int = s, in_window: bool = in_window) -> Action:
            return Action.REUSE if in_window and s % period != 0 else Action.COMPUTE

        cross, mlp = act(config.cross_range), act(config.mlp_range)
        actions = {
            "spatial": {"attn": act(config.spatial_range), "cross": cross, "mlp": mlp},
            "temporal": {"attn": act(config.temporal_range), "cross": cross, "mlp": mlp},
        }
        full = all(a is Action.COMPUTE for acts in actions.values() for a in acts.values())
        plans.append(StepPlan(StepKind.FULL if full else StepKind.MODULE_REUSE, actions))
    return plans


class PABPolicy(CachePolicy):
    def plan(self) -> list[StepPlan]:
        return pab_schedule(self.config, self.sample.timesteps)


METHODS = (PABConfig,)
