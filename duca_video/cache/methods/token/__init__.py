"""The token-cache family: DuCa, ToCa, FORA, aggressive-only and conservative-only caching.

One schedule: step s is full while s < warmup_steps, afterwards pattern[s % cycle]. Full steps refresh the
cache (cross-attention only every `cross_cycle` steps), conservative steps reuse the cached module outputs and
recompute a share of the tokens of the modules in `recompute`, aggressive steps reuse the whole stack's output.
`forecast_order=1` makes aggressive steps extrapolate the stack output linearly (in t) from the last two
computed steps instead of reusing the last one: DuCa-forecast, which the published code does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...config import MODULES, SELECTORS, STEP_KINDS, CacheConfig, check_field
from ...policy import CachePolicy, Sample
from ...schedule import Action, StepPlan, same_actions
from ...state import STACK


@dataclass
class TokenCacheConfig(CacheConfig):
    """The schedule family shared by DuCa, ToCa, FORA, aggressive-only and conservative-only caching.

    Step s (0-based) is full while s < warmup_steps; afterwards its kind is pattern[s % cycle]. In full steps
    cross-attention is recomputed only when s % cross_cycle == 0 (else its cached output is reused whole).
    Conservative steps recompute the modules in `recompute` for a fraction `recompute_ratio` (= 1 - R) of the
    tokens picked by `selector`, plus `age_bonus` x (steps since the token was last computed). Aggressive steps
    reuse the stack output (forecast_order=0) or extrapolate it from the last two computed steps (1).
    """

    fold_ok: ClassVar[bool] = True

    warmup_steps: int = 3
    cycle: int = 3
    pattern: tuple[str, ...] = ("full", "conservative", "aggressive")
    cross_cycle: int = 6
    recompute_ratio: float = 0.1495
    recompute: tuple[str, ...] = ("mlp",)
    selector: str = "random"
    age_bonus: float = 0.0
    forecast_order: int = 0

    def validate(self) -> None:
        m = self.method
        self.pattern, self.recompute = tuple(self.pattern), tuple(self.recompute)
        for name, low in (("warmup_steps", 0), ("cycle", 1), ("cross_cycle", 1)):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value >= low, m, name, f"int >= {low}", value)
        check_field(
            len(self.pattern) == self.cycle,
            m,
            "pattern",
            f"a sequence of {self.cycle} (= cycle) step kinds",
            self.pattern,
        )
        bad = [k for k in self.pattern if k not in STEP_KINDS]
        check_field(not bad, m, "pattern", f"entries from {STEP_KINDS}", self.pattern)
        check_field("full" in self.pattern, m, "pattern", "at least one 'full' step per cycle", self.pattern)
        check_field(
            0.0 <= self.recompute_ratio <= 1.0, m, "recompute_ratio", "a number in [0, 1]", self.recompute_ratio
        )
        bad = [k for k in self.recompute if k not in MODULES]
        check_field(not bad, m, "recompute", f"a subset of {MODULES}", self.recompute)
        check_field(self.selector in SELECTORS, m, "selector", str(SELECTORS), self.selector)
        check_field(self.age_bonus >= 0, m, "age_bonus", "a number >= 0", self.age_bonus)
        check_field(
            self.forecast_order in (0, 1), m, "forecast_order", "0 (reuse) or 1 (linear forecast)", self.forecast_order
        )

    def make_policy(self, sample: Sample) -> TokenPolicy:
        return TokenPolicy(self, sample)


@dataclass
class DuCaConfig(TokenCacheConfig):
    """Dual Feature Caching. The default reproduces the published Open-Sora schedule: 3 full warm-up steps,
    then cycles of (full, conservative, aggressive), cross-attention refreshed every 6 steps, 14.95% of the
    tokens' MLP recomputed in conservative steps, random token selection. `preset="paper"` follows the paper's
    text instead (`enable(model, "duca", preset="paper")`): cycle N=5 of (full, conservative, aggressive,
    conservative, aggressive), R=0.9, cross-attention refreshed with every full step."""

    method: ClassVar[str] = "duca"


@dataclass
class DuCaForecastConfig(DuCaConfig):
    """DuCa whose aggressive steps forecast the stack output (first-order Taylor in t, from the last two steps
    that computed the stack) instead of reusing the last one; one more stack tensor held."""

    method: ClassVar[str] = "duca_forecast"
    forecast_order: int = 1


@dataclass
class ToCaConfig(TokenCacheConfig):
    """Token-wise caching, conservative only (the published Open-Sora setting: full every 3 steps after 3
    warm-up steps, cross-attention every 6, 14.95% of MLP tokens, selected by cross-attention entropy)."""

    method: ClassVar[str] = "toca"
    pattern: tuple[str, ...] = ("full", "conservative", "conservative")
    selector: str = "cross_entropy"


@dataclass
class ConservativeConfig(TokenCacheConfig):
    """Conservative-only caching with random selection (ToCa's schedule, DuCa's selector)."""

    method: ClassVar[str] = "conservative"
    pattern: tuple[str, ...] = ("full", "conservative", "conservative")


@dataclass
class AggressiveConfig(TokenCacheConfig):
    """Aggressive-only: the whole block stack is reused between full steps."""

    method: ClassVar[str] = "aggressive"
    pattern: tuple[str, ...] = ("full", "aggressive", "aggressive")
    cross_cycle: int = 1
    recompute: tuple[str, ...] = ()


@dataclass
class ForaConfig(TokenCacheConfig):
    """FORA: every module's output is reused for N-1 steps (the residual stream still runs)."""

    method: ClassVar[str] = "fora"
    warmup_steps: int = 0
    pattern: tuple[str, ...] = ("full", "conservative", "conservative")
    cross_cycle: int = 1
    recompute_ratio: float = 0.0
    recompute: tuple[str, ...] = ()


def token_schedule(config: TokenCacheConfig, num_steps: int) -> list[StepPlan]:
    plans = []
    for s in range(num_steps):
        kind = "full" if s == 0 or s < config.warmup_steps else config.pattern[s % config.cycle]
        if kind == "full":
            cross = Action.COMPUTE if s < config.warmup_steps or s % config.cross_cycle == 0 else Action.REUSE
            acts = {"attn": Action.COMPUTE, "cross": cross, "mlp": Action.COMPUTE}
        elif kind == "conservative":
            partial = Action.PARTIAL if config.recompute_ratio > 0 else Action.REUSE
            acts = {m: partial if m in config.recompute else Action.REUSE for m in MODULES}
        else:
            acts = dict.fromkeys(MODULES, Action.REUSE)
        plans.append(StepPlan(kind, same_actions(acts)))
    return plans


class TokenPolicy(CachePolicy):
    def __init__(self, config: TokenCacheConfig, sample: Sample) -> None:
        super().__init__(config, sample)
        self.held: dict[int, float] = {}  # forecast: step -> t of the stack outputs held (store slot "stack@step")

    def plan(self) -> list[StepPlan]:
        return token_schedule(self.config, len(self.sample.timesteps))

    def compute_stack(self, block: nn.Module, x: torch.Tensor, t: torch.Tensor) -> bool:
        if self.config.forecast_order == 0:
            return super().compute_stack(block, x, t)
        if self.sample.plan.skips_stack:
            return False
        self._release(self._pair(self.sample.step))  # free what no later forecast reads before computing
        return True

    def _release(self, wanted: set[int]) -> None:
        for old in [s for s in self.held if s not in wanted]:
            self.store.drop(STACK, f"stack@{old}")
            del self.held[old]

    def _pair(self, step: int) -> set[int]:
        """The computed steps the next aggressive step after `step` extrapolates from (its last two)."""
        plans = self.sample.plans
        nxt = next((a for a in range(step + 1, len(plans)) if plans[a].skips_stack), None)
        if nxt is None:
            return set()
        return set([s for s in range(nxt) if not plans[s].skips_stack][-2:])

    def reuse_stack(self, stack_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.config.forecast_order == 0:
            return super().reuse_stack(stack_in, x)
        steps = sorted(self.held)
        newer = self.store.get(STACK, f"stack@{steps[-1]}")
        if len(steps) < 2:
            return newer
        t0, t1 = self.held[steps[0]], self.held[steps[1]]
        older = self.store.get(STACK, f"stack@{steps[0]}")
        # First-order Taylor in t: O(t) ~ O(t1) + (t - t1) * (O(t1) - O(t0)) / (t1 - t0).
        return newer + (newer - older) * ((self.sample.t - t1) / (t1 - t0))

    def update_stack(self, stack_in: torch.Tensor, out: torch.Tensor) -> None:
        if self.config.forecast_order == 0:
            return super().update_stack(stack_in, out)
        step = self.sample.step
        wanted = self._pair(step)
        self._release(wanted)
        if step in wanted:
            self.store.put(STACK, f"stack@{step}", out)
            self.held[step] = self.sample.t


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "duca": {
        "published": {},
        "paper": dict(
            warmup_steps=0,
            cycle=5,
            cross_cycle=5,
            recompute_ratio=0.1,
            pattern=("full", "conservative", "aggressive", "conservative", "aggressive"),
        ),
    }
}

METHODS = (DuCaConfig, ToCaConfig, ForaConfig, AggressiveConfig, ConservativeConfig, DuCaForecastConfig)
