"""Static schedules: for every step, what each module of each block kind does, and what must be stored.

Actions per module: COMPUTE (all tokens), REUSE (cached output, whole), PARTIAL (cached output with a subset
of tokens recomputed). A step's kind (`records.StepKind`) is FULL, MODULE_REUSE, or STACK_SKIP when the whole
block stack is replaced by its cached output.
Knowing the schedule up front lets a step store only what a later step will read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .records import StepKind

BLOCK_KINDS = ("spatial", "temporal")


class Action(str, Enum):
    COMPUTE = "compute"
    REUSE = "reuse"
    PARTIAL = "partial"


@dataclass
class StepPlan:
    kind: StepKind  # FULL | MODULE_REUSE | STACK_SKIP (a label such as DuCa's "aggressive" is converted)
    actions: dict[str, dict[str, Action]]  # block kind -> module -> action
    # Filled by `mark_storage`: the module caches a later step reads, and whether the stack output is read.
    keep: dict[str, set[str]] = field(default_factory=lambda: {k: set() for k in BLOCK_KINDS})
    keep_stack: bool = False

    def __post_init__(self) -> None:
        self.kind = StepKind(self.kind)

    @property
    def skips_stack(self) -> bool:
        return self.kind is StepKind.STACK_SKIP

    def action(self, block_kind: str, module: str) -> Action:
        return self.actions[block_kind][module]

    def short(self, block_kind: str) -> str:
        return "".join(self.actions[block_kind][m].value[0].upper() for m in ("attn", "cross", "mlp"))


def same_actions(actions: dict[str, Action]) -> dict[str, dict[str, Action]]:
    """The same module actions for spatial and temporal blocks."""
    return {k: dict(actions) for k in BLOCK_KINDS}


def full_schedule(num_steps: int) -> list[StepPlan]:
    return [
        StepPlan(StepKind.FULL, same_actions(dict.fromkeys(("attn", "cross", "mlp"), Action.COMPUTE)))
        for _ in range(num_steps)
    ]


def mark_storage(plans: list[StepPlan]) -> list[StepPlan]:
    """Set `keep` / `keep_stack`: after step s a module's cache is kept iff a later step reads it (REUSE or
    PARTIAL) before computing the module afresh; the stack output iff the next step is aggressive. A COMPUTE
    step stores its output only when it is kept, and everything else is freed: only what is read is held."""
    for kind in BLOCK_KINDS:
        for module in ("attn", "cross", "mlp"):
            needed = False  # scanning backwards: is the cache read after this step?
            for plan in reversed(plans):
                if needed:
                    plan.keep[kind].add(module)
                act = None if plan.skips_stack else plan.action(kind, module)
                if act is Action.COMPUTE:
                    needed = False
                elif act in (Action.REUSE, Action.PARTIAL):
                    needed = True
    for s, plan in enumerate(plans):
        plan.keep_stack = s + 1 < len(plans) and plans[s + 1].skips_stack
    return plans


def build_schedule(config: Any, timesteps: tuple[float, ...]) -> list[StepPlan]:
    """The plan a method's policy makes for these timesteps, with its storage marked (what later steps read)."""
    from .policy import Sample  # the policies import this module

    sample = Sample(tuple(timesteps), cfg=False, rows=1, seeds=(0,))
    policy = config.make_policy(sample)
    return policy.mark(policy.plan())


def schedule_table(plans: list[StepPlan]) -> list[dict[str, str]]:
    """Rows (step, kind, spatial, temporal) with module actions as C/R/P letters for attn, cross, mlp."""
    return [
        {"step": str(s), "kind": p.kind.value, "spatial": p.short("spatial"), "temporal": p.short("temporal")}
        for s, p in enumerate(plans)
    ]
