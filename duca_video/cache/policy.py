"""The policy interface: what a caching method decides, separate from how the blocks run.

One policy object exists per sample: the method's config makes it when a sample starts
(`config.make_policy(sample)`) and it is dropped when the sample ends, so a method's per-sample state (TeaCache's
accumulator, TaylorSeer's differences, ...) lives in it and never needs resetting. The controller
(`plugin.CacheController`) runs every block; at these points it asks the policy:

    plan()                         the static schedule: per step and block kind, which modules are computed,
                                   reused (or approximated) or partly recomputed, and which steps skip the stack
    mark(plans)                    what each step keeps for later ones (default: `schedule.mark_storage`)
    compute_stack(block, x, t)     before the first block of a step: run the block stack, or skip it (a bool,
                                   or one bool per video: then only the computing videos' rows run the stack)
    after_first_block(x_in, out)   after the first block (First-Block Cache): go on, or skip the rest (same)
    reuse_stack(stack_in, x)       the stack's output on a skipped step
    update_stack(stack_in, out)    after a computed stack
    approximate(index, module)     a module's output where the plan does not compute it (default: the stored one)
    update(index, module, value, keep)   after computing a module; `keep` says whether a later step reads it
    model_forward(call, args, kwargs)    around the whole model call (e.g. a CFG cache); default: just call it

Storage goes through `sample.store` (a `CacheState`, byte-accounted). The plan's `keep` sets (from
`schedule.mark_storage`) say what a later step reads, so a policy stores only that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .schedule import StepPlan, full_schedule, mark_storage
from .state import STACK, CacheState


@dataclass
class StepState:
    """What the stack does at the current step, passed from block to block: made afresh when the step's first
    block starts."""

    skip_stack: bool = False  # this step skips the block stack
    stack_in: torch.Tensor | None = None  # the stack's input of this step
    # A step where some videos compute and the others skip: the computing rows (device indices), and the full
    # tensor the skipped rows are rebuilt from (the stack input, or block 0's output for First-Block Cache).
    compute_rows: torch.Tensor | None = None
    compute_list: list[int] = field(default_factory=list)  # the same rows as Python ints
    pass_x: torch.Tensor | None = None


@dataclass
class TokenScratch:
    """The token family's working state for one sample (`methods/token/`): its pre-drawn selections and the
    folding's next timestep modulation."""

    drawn: Any = None  # the pre-drawn random selections (drawing.DrawnSelection)
    picked: tuple[torch.Tensor, int] | None = None  # last pre-drawn indices handed out and their row count
    predraw_due: bool = True  # the first forward draws
    next_t_mlp: tuple[int, torch.Tensor] | None = None  # folding: the next step's timestep modulation


@dataclass
class Sample:
    """Everything the cache holds for one sample (a batch denoised together, both CFG halves): made when the
    sample starts, dropped when it ends. Facts about the sample first, then where the engine is (plan, step,
    store, policy), then `now` (this step), `tokens` (the token family's state) and the history."""

    # -- facts ---------------------------------------------------------------------------------------------
    timesteps: tuple[float, ...]
    cfg: bool
    rows: int  # model batch rows (CFG halves included)
    seeds: tuple[int, ...]  # one per video
    layout: Any = None  # the sequence-parallel token layout (None on one process)
    row_group: Any = None  # CFG parallelism: the group holding the other CFG half's rows (None otherwise)
    per_video: bool = True  # rows can be sliced (False for upstream's packed captions: one decision per batch)
    # -- the engine ------------------------------------------------------------------------------------------
    store: CacheState = field(default_factory=CacheState)  # or an OffloadedState (cache in host memory)
    plans: list[StepPlan] = field(default_factory=list)
    policy: CachePolicy | None = None
    step: int = -1
    plan: StepPlan | None = None
    now: StepState = field(default_factory=StepState)
    tokens: TokenScratch = field(default_factory=TokenScratch)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def t(self) -> float:
        return self.timesteps[self.step]

    @property
    def last_step(self) -> bool:
        return self.step == len(self.timesteps) - 1

    @property
    def videos(self) -> int:
        return self.rows // 2 if self.cfg else self.rows

    def rows_of(self, videos: list[int]) -> list[int]:
        """The model batch rows of these videos (both CFG halves)."""
        return [*videos, *(v + self.videos for v in videos)] if self.cfg else list(videos)


class CachePolicy:
    """The default policy computes everything (method `none`); methods override what they change."""

    def __init__(self, config: Any, sample: Sample) -> None:
        self.config = config
        self.sample = sample

    @property
    def store(self) -> CacheState:
        return self.sample.store

    def plan(self) -> list[StepPlan]:
        return full_schedule(len(self.sample.timesteps))

    def mark(self, plans: list[StepPlan]) -> list[StepPlan]:
        """The plan with its storage marked: by default a module's output is kept while a later step reads it."""
        return mark_storage(plans)

    # -- the whole block stack ---------------------------------------------------------------------------
    def compute_stack(self, block: nn.Module, x: torch.Tensor, t: torch.Tensor) -> bool:
        compute = not self.sample.plan.skips_stack
        if compute:  # only a skipped step reads the stack output: free it before computing
            self.store.drop(STACK, "output")
        return compute

    def after_first_block(self, stack_in: torch.Tensor, out: torch.Tensor) -> bool:
        return True

    def reuse_stack(self, stack_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.store.get(STACK, "output")

    def update_stack(self, stack_in: torch.Tensor, out: torch.Tensor) -> None:
        if self.sample.plan.keep_stack:
            self.store.put(STACK, "output", out)
        else:
            self.store.drop(STACK, "output")

    # -- one module of one block ---------------------------------------------------------------------------
    def approximate(self, index: int, module: str) -> torch.Tensor:
        value = self.store.get(index, module)
        if value is None:
            raise RuntimeError(
                f"cache {self.config.method!r}: step {self.sample.step} reuses {module} of block "
                f"{index}, which no earlier step stored"
            )
        return value

    def update(self, index: int, module: str, value: torch.Tensor, keep: bool) -> None:
        if keep:
            self.store.put(index, module, value)
        else:
            self.store.drop(index, module)

    # -- the model call ----------------------------------------------------------------------------------
    def model_forward(self, call: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        return call(*args, **kwargs)


class ResidualStackPolicy(CachePolicy):
    """Skipped steps add the residual (output - input) of the stack's last computed step to this step's input
    (TeaCache, MagCache): one stack tensor held while a later step may skip."""

    def compute_stack(self, block: nn.Module, x: torch.Tensor, t: torch.Tensor) -> bool:
        return not self.sample.plan.skips_stack

    def reuse_stack(self, stack_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return stack_in + self.store.get(STACK, "residual")

    def update_stack(self, stack_in: torch.Tensor, out: torch.Tensor) -> None:
        if not self.residual_needed():
            self.store.drop(STACK, "residual")
        else:
            refresh_rows(self.store, "residual", out - stack_in, self.sample.now.compute_rows)

    def residual_needed(self) -> bool:
        """Whether a later step may skip (dynamic methods: unless this is the last step)."""
        later = self.sample.plans[self.sample.step + 1 :]
        return any(p.skips_stack for p in later)


def refresh_rows(store: CacheState, name: str, value: torch.Tensor, rows: torch.Tensor | None) -> None:
    """Store `value` as the stack slot `name`, or on a step where only `rows` computed, those rows of it (the
    others keep what their own last computed step stored, exactly)."""
    held = store.get(STACK, name)
    if rows is None or held is None:
        store.put(STACK, name, value)
    else:
        held.index_copy_(0, rows, value.index_select(0, rows))


__all__ = ["CachePolicy", "ResidualStackPolicy", "Sample", "StepState", "TokenScratch", "refresh_rows"]
