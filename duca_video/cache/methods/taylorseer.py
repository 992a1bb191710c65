"""TaylorSeer: between full steps, forecast each module's output from its Taylor expansion in t.

Full steps are the first `warmup_steps` and then every `interval`-th. On a full step each block's module outputs
F (self-attention, cross-attention, MLP; before their gates) update finite differences over the last two full
steps: D0 = F, D(i+1) = (Di_new - Di_old) / (t_new - t_old), up to `order`. A cached step at t uses
F(t) ~ sum_i Di (t - t_full)^i / i! and runs the residual stream with the current gates, as FORA does; order 0
is FORA's reuse. Memory: (order + 1) tensors per module per block, held only while a later step reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import MODULES, CacheConfig, check_field
from ..policy import CachePolicy, Sample
from ..records import StepKind
from ..schedule import Action, StepPlan, mark_storage, same_actions


@dataclass
class TaylorSeerConfig(CacheConfig):
    """TaylorSeer: full steps at s < warmup_steps and every `interval` steps after; in between, every module's
    output is forecast with a Taylor series of `order` from the full steps' finite differences."""

    method: ClassVar[str] = "taylorseer"
    reads_on_update: ClassVar[bool] = True  # a full step's update reads the older values
    interval: int = 4
    order: int = 1
    warmup_steps: int = 3

    def validate(self) -> None:
        for name, low in (("interval", 1), ("order", 0), ("warmup_steps", 0)):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value >= low, self.method, name, f"int >= {low}", value)

    def make_policy(self, sample: Sample) -> TaylorSeerPolicy:
        return TaylorSeerPolicy(self, sample)


def _slot(module: str, order: int) -> str:
    return module if order == 0 else f"{module}^{order}"


class TaylorSeerPolicy(CachePolicy):
    def __init__(self, config: TaylorSeerConfig, sample: Sample) -> None:
        super().__init__(config, sample)
        self.t_full: dict[tuple[int, str], float] = {}  # t of the full step the differences were taken at

    def plan(self) -> list[StepPlan]:
        cfg, plans = self.config, []
        for s in range(len(self.sample.timesteps)):
            full = s < max(cfg.warmup_steps, 1) or (s - cfg.warmup_steps) % cfg.interval == 0
            action = Action.COMPUTE if full else Action.REUSE
            kind = StepKind.FULL if full else StepKind.MODULE_REUSE
            plans.append(StepPlan(kind, same_actions(dict.fromkeys(MODULES, action))))
        return plans

    def mark(self, plans: list[StepPlan]) -> list[StepPlan]:
        """Differences need the previous full step's values, so with order > 0 a step keeps every module while
        any later step forecasts (order 0 is plain reuse: the default liveness)."""
        plans = mark_storage(plans)
        if self.config.order > 0:
            forecast_after = False
            for plan in reversed(plans):
                if forecast_after:
                    for kind in plan.keep:
                        plan.keep[kind] |= set(MODULES)
                forecast_after = forecast_after or plan.kind is not StepKind.FULL
        return plans

    def update(self, index: int, module: str, value: torch.Tensor, keep: bool) -> None:
        order = self.config.order
        if not keep:
            for i in range(order + 1):
                self.store.drop(index, _slot(module, i))
            self.t_full.pop((index, module), None)
            return
        t = self.sample.t
        old = [self.store.get(index, _slot(module, i)) for i in range(order + 1)]
        new = [value]
        if old[0] is not None and t != self.t_full[(index, module)]:
            dt = t - self.t_full[(index, module)]
            for i in range(1, order + 1):
                if old[i - 1] is None:
                    break
                new.append((new[i - 1] - old[i - 1]) / dt)
        for i in range(order + 1):
            if i < len(new):
                self.store.put(index, _slot(module, i), new[i])
            else:
                self.store.drop(index, _slot(module, i))
        self.t_full[(index, module)] = t

    def approximate(self, index: int, module: str) -> torch.Tensor:
        out = super().approximate(index, module)
        dt = self.sample.t - self.t_full[(index, module)]
        for i in range(1, self.config.order + 1):
            term = self.store.get(index, _slot(module, i))
            if term is None:
                break
            out = out + term * (dt**i / math.factorial(i))
        return out


METHODS = (TaylorSeerConfig,)
