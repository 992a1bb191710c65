"""Step kinds, and a step's record in the controller's history: a typed kind and, for a step where only some
videos computed, one flag per video. The history keeps its text label (`full`, `aggressive`, `mixed:1011`, ...),
which records, summaries and FLOP replays carry; it is written by `label` and read back by `parse`, here only.

The engine's names say what it does (module reuse, stack skip); the labels in files keep DuCa's words
(`conservative`, `aggressive`), which is what those steps are in the paper and what earlier files hold."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class StepKind(str, Enum):
    FULL = "full"  # every module of every block computed
    MODULE_REUSE = "conservative"  # the blocks run, some modules reused or partly recomputed (DuCa: conservative)
    STACK_SKIP = "aggressive"  # the whole block stack skipped, its output reused or forecast (DuCa: aggressive)
    MIXED = "mixed"  # the stack skipped for some videos of the batch, computed for the others
    FIRST_BLOCK = "first_block"  # block 0 computed, the rest skipped (for some videos, with flags)


@dataclass(frozen=True)
class StepRecord:
    kind: StepKind
    computing: tuple[bool, ...] | None = None  # per video, on a step only some videos computed

    @property
    def label(self) -> str:
        if self.computing is None:
            return self.kind.value
        return f"{self.kind.value}:{''.join('1' if c else '0' for c in self.computing)}"

    @classmethod
    def parse(cls, label: str) -> StepRecord:
        kind, _, bits = label.partition(":")
        return cls(StepKind(kind), tuple(b == "1" for b in bits) if bits else None)

    @classmethod
    def skipped(cls, after_first_block: bool, computing: list[bool]) -> StepRecord:
        """The record of a step where the videos flagged False skipped (after block 0, or the whole stack)."""
        partial = any(computing)
        if after_first_block:
            return cls(StepKind.FIRST_BLOCK, tuple(computing) if partial else None)
        return cls(StepKind.MIXED, tuple(computing)) if partial else cls(StepKind.STACK_SKIP)

    def computes(self, after_first_block: bool, videos: int) -> bool | list[bool]:
        """Replaying this step: whether the stack (or, after block 0, the rest) runs, for all or per video."""
        skips_here = self.kind is (StepKind.FIRST_BLOCK if after_first_block else StepKind.MIXED)
        if self.computing is not None:
            return list(self.computing) if skips_here else True
        return self.kind is not (StepKind.FIRST_BLOCK if after_first_block else StepKind.STACK_SKIP)
