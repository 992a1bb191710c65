"""`auto`: ask for a speed-up, get the schedule that a calibration of the model predicts is closest to uncached.

A schedule gives every step one letter:
  F  full: every module computed for every token (the caches refreshed)
  C  conservative (DuCa's): cached module outputs reused, the MLP recomputed for `recompute_ratio` of the tokens
  M  module reuse (FORA's): every module's cached output reused, the residual stream runs
  A  stack reuse (DuCa's aggressive step): the block stack's last computed output, whole
  R  residual reuse (TeaCache's / MagCache's skip): this step's stack input + the last computed stack residual
  S  spatial blocks computed, temporal blocks' modules reused (T: the other way round): one block kind refreshed

`schedule="FFRRC..."` runs that schedule as written. Otherwise the schedule is solved, when a sample starts,
for `speedup` (in FLOPs of the sampling loop; with `budget="time"`, in the step times the calibration measured)
from a calibration of the model (see `auto_solver`): the path of full steps, and the letters between them, with
the least predicted error for that budget. `calibration` is a
file made by `python -m duca_video.cache.calibrate`, or `opensora12-magcache`: Open-Sora 1.2 at 480p from the
MagCache authors' published magnitude ratios (F and R only; the only real-model calibration data there is).
The plan is static, so sequence and CFG parallelism, offload, batch invariance and FLOP replays hold as for
every static method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import MODULES, CacheConfig, check_field
from ..policy import CachePolicy, Sample
from ..records import StepKind
from ..schedule import Action, StepPlan
from ..state import STACK
from .auto_solver import BUILTIN, LETTERS, Calibration, load_calibration, magcache_calibration, solve

_FULL, _REUSE = dict.fromkeys(MODULES, Action.COMPUTE), dict.fromkeys(MODULES, Action.REUSE)
_PARTIAL = {"attn": Action.REUSE, "cross": Action.REUSE, "mlp": Action.PARTIAL}
_ACTIONS = {  # letter -> (step kind, spatial blocks' module actions, temporal blocks')
    "F": (StepKind.FULL, _FULL, _FULL),
    "C": (StepKind.MODULE_REUSE, _PARTIAL, _PARTIAL),
    "M": (StepKind.MODULE_REUSE, _REUSE, _REUSE),
    "A": (StepKind.STACK_SKIP, _REUSE, _REUSE),
    "R": (StepKind.STACK_SKIP, _REUSE, _REUSE),
    "S": (StepKind.MODULE_REUSE, _FULL, _REUSE),
    "T": (StepKind.MODULE_REUSE, _REUSE, _FULL),
}
_SLOTS = {"A": "output", "R": "residual"}  # the stack tensor a skipped step reads


def plans_of(letters: str) -> list[StepPlan]:
    """The engine's step plans for a schedule written in letters."""
    plans = []
    for c in letters:
        kind, spatial, temporal = _ACTIONS[c]
        plans.append(StepPlan(kind, {"spatial": dict(spatial), "temporal": dict(temporal)}))
    return plans


@dataclass
class AutoConfig(CacheConfig):
    """The schedule solved for `speedup` (FLOPs of the loop) from `calibration`, or `schedule` as written."""

    method: ClassVar[str] = "auto"
    fold_ok: ClassVar[bool] = True
    # What the engine's token machinery reads for C steps (fixed: the calibration measured these).
    recompute: ClassVar[tuple[str, ...]] = ("mlp",)
    selector: ClassVar[str] = "random"
    age_bonus: ClassVar[float] = 0.0

    speedup: float = 2.5
    calibration: str = BUILTIN
    schedule: str = ""
    budget: str = "flops"  # what `speedup` divides: "flops", or "time" (the calibration's measured step times)

    def validate(self) -> None:
        m = self.method
        check_field(1.0 <= self.speedup <= 100.0, m, "speedup", "a number in [1, 100] (FLOPs speed-up)", self.speedup)
        bad = sorted(set(self.schedule) - set(LETTERS))
        check_field(not bad, m, "schedule", f"letters from {LETTERS} (one per step), or empty to solve", self.schedule)
        check_field(not self.schedule or self.schedule[0] == "F", m, "schedule", "starting with F", self.schedule)
        check_field(self.budget in ("flops", "time"), m, "budget", "'flops' or 'time'", self.budget)
        check_field(bool(self.calibration), m, "calibration", f"a calibration file or {BUILTIN!r}", self.calibration)
        # Read now, so that a missing or broken file is an error before any model loads.
        self._calibration = None if self.schedule else load_calibration(self.calibration)

    @property
    def recompute_ratio(self) -> float:
        cal = self.loaded_calibration()
        return cal.recompute_ratio if cal is not None else 0.15

    def loaded_calibration(self) -> Calibration | None:
        if self.schedule:
            return None
        if getattr(self, "_calibration", None) is None:
            self.validate()
        return self._calibration

    def letters(self, num_steps: int) -> str:
        """The schedule for a run of `num_steps` steps (solved once per step count, then remembered)."""
        if self.schedule:
            if len(self.schedule) != num_steps:
                raise ValueError(
                    f"cache method 'auto': schedule has {len(self.schedule)} letters for a run of {num_steps} steps"
                )
            return self.schedule
        solved = getattr(self, "_solved", {})
        if num_steps not in solved:
            cal = self.loaded_calibration()
            if cal.source == BUILTIN and cal.num_steps != num_steps:  # MagCache's ratios, resampled (as MagCache)
                cal = magcache_calibration(num_steps)
            solved[num_steps] = solve(cal, self.speedup, num_steps, self.budget)
            self._solved = solved
        return solved[num_steps].letters

    def check_run(self, num_steps: int) -> None:
        self.letters(num_steps)  # a wrong length, another step count or an out-of-reach target: ValueError

    def input_digests(self) -> dict[str, str]:
        cal = self.loaded_calibration()
        return {} if cal is None else {"calibration": cal.digest}

    def summary_lines(self, num_steps: int) -> list[str]:
        if self.schedule:
            return [f"schedule as written: {self.schedule}"]
        self.letters(num_steps)
        return self._solved[num_steps].describe()

    def make_policy(self, sample: Sample) -> AutoPolicy:
        return AutoPolicy(self, sample)


class AutoPolicy(CachePolicy):
    """Runs the letters: module actions through the plan; A / R steps read the stack slot their letter names."""

    def __init__(self, config: AutoConfig, sample: Sample) -> None:
        super().__init__(config, sample)
        self.letters = config.letters(len(sample.timesteps))

    def plan(self) -> list[StepPlan]:
        return plans_of(self.letters)

    def _skips_after(self, step: int) -> set[str]:
        """The letters of the run of skipped steps right after `step` (what they read of this step)."""
        run = set()
        for c in self.letters[step + 1 :]:
            if c not in _SLOTS:
                break
            run.add(c)
        return run

    def compute_stack(self, block: nn.Module, x: torch.Tensor, t: torch.Tensor) -> bool:
        return self.letters[self.sample.step] not in _SLOTS

    def reuse_stack(self, stack_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.letters[self.sample.step] == "A":
            return self.store.get(STACK, "output")
        return stack_in + self.store.get(STACK, "residual")

    def update_stack(self, stack_in: torch.Tensor, out: torch.Tensor) -> None:
        wanted = self._skips_after(self.sample.step)
        for letter, slot in _SLOTS.items():
            if letter not in wanted:
                self.store.drop(STACK, slot)
            else:
                self.store.put(STACK, slot, out if slot == "output" else out - stack_in)


METHODS = (AutoConfig,)

__all__ = ["AutoConfig", "AutoPolicy", "plans_of"]
