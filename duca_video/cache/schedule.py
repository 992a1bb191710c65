"""Static schedules: for every step, what each module of each block kind does, and what must be stored.

Actions per module: COMPUTE (all tokens), REUSE (cached output, whole), PARTIAL (cached output with a subset
of tokens recomputed). A step is "aggressive" when the whole block stack is replaced by its cached output.
Knowing the schedule up front lets a step store only what a later step will read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .config import CacheConfig, PABConfig, TokenCacheConfig

BLOCK_KINDS = ("spatial", "temporal")


class Action(str, Enum):
    COMPUTE = "compute"
    REUSE = "reuse"
    PARTIAL = "partial"


@dataclass
class StepPlan:
    kind: str  # full | conservative | aggressive
    actions: dict[str, dict[str, Action]]  # block kind -> module -> action
    # Filled by `mark_storage`: the module caches a later step reads, and whether the stack output is read.
    keep: dict[str, set[str]] = field(default_factory=lambda: {k: set() for k in BLOCK_KINDS})
    keep_stack: bool = False

    def action(self, block_kind: str, module: str) -> Action:
        return self.actions[block_kind][module]

    def short(self, block_kind: str) -> str:
        return "".join(self.actions[block_kind][m].value[0].upper() for m in ("attn", "cross", "mlp"))


def _same(actions: dict[str, Action]) -> dict[str, dict[str, Action]]:
    return {k: dict(actions) for k in BLOCK_KINDS}


def token_schedule(config: TokenCacheConfig, num_steps: int) -> list[StepPlan]:
    plans = []
    for s in range(num_steps):
        kind = "full" if s == 0 or s < config.warmup_steps else config.pattern[s % config.cycle]
        if kind == "full":
            cross = Action.COMPUTE if s < config.warmup_steps or s % config.cross_cycle == 0 else Action.REUSE
            acts = {"attn": Action.COMPUTE, "cross": cross, "mlp": Action.COMPUTE}
        elif kind == "conservative":
            partial = Action.PARTIAL if config.recompute_ratio > 0 else Action.REUSE
            acts = {m: partial if m in config.recompute else Action.REUSE for m in ("attn", "cross", "mlp")}
        else:
            acts = dict.fromkeys(("attn", "cross", "mlp"), Action.REUSE)
        plans.append(StepPlan(kind, _same(acts)))
    return plans


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
        plans.append(StepPlan("full" if full else "conservative", actions))
    return plans


def full_schedule(num_steps: int) -> list[StepPlan]:
    return [StepPlan("full", _same(dict.fromkeys(("attn", "cross", "mlp"), Action.COMPUTE))) for _ in range(num_steps)]


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
                act = None if plan.kind == "aggressive" else plan.action(kind, module)
                if act is Action.COMPUTE:
                    needed = False
                elif act in (Action.REUSE, Action.PARTIAL):
                    needed = True
    for s, plan in enumerate(plans):
        plan.keep_stack = s + 1 < len(plans) and plans[s + 1].kind == "aggressive"
    return plans


def build_schedule(config: CacheConfig, timesteps: tuple[float, ...]) -> list[StepPlan]:
    num_steps = len(timesteps)
    if isinstance(config, TokenCacheConfig):
        plans = token_schedule(config, num_steps)
    elif isinstance(config, PABConfig):
        plans = pab_schedule(config, timesteps)
    else:  # none, steps, teacache (teacache decides per step at run time)
        plans = full_schedule(num_steps)
    return mark_storage(plans)


def schedule_table(plans: list[StepPlan]) -> list[dict[str, str]]:
    """Rows (step, kind, spatial, temporal) with module actions as C/R/P letters for attn, cross, mlp."""
    return [
        {"step": str(s), "kind": p.kind, "spatial": p.short("spatial"), "temporal": p.short("temporal")}
        for s, p in enumerate(plans)
    ]
