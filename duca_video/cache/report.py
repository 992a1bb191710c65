"""The controller's text summary of a sample: one line per step."""

from __future__ import annotations

from typing import Any

from .config import CacheConfig
from .records import StepRecord

_SKIPPED = {"aggressive": "stack reused", "first_block": "first block computed, rest reused", "mixed": "stack reused"}


def summary_text(config: CacheConfig, history: list[dict[str, Any]], cache_bytes: int) -> str:
    """What each step did (C = computed, R = reused, P = partly recomputed; for attn / cross / mlp of the
    spatial and temporal blocks) and the share of tokens recomputed per module."""
    header = f"{'step':>4} {'t':>8}  {'kind':<12} {'spatial':<8} {'temporal':<8} recomputed (attn/cross/mlp)"
    lines = [f"cache method {config.method}: {config.to_dict()}"]
    if history:
        lines += config.summary_lines(len(history))
    lines.append(header)
    counts: dict[str, int] = {}
    for h in history:
        record = StepRecord.parse(h["kind"])
        counts[record.kind.value] = counts.get(record.kind.value, 0) + 1
        lines.append(
            f"{h['step']:>4} {h['t']:>8.2f}  {h['kind']:<12} {h['spatial']:<8} {h['temporal']:<8} {_share(h, record)}"
        )
    lines.append(f"steps: {counts}; peak cache {cache_bytes / 2**20:.1f} MiB")
    return "\n".join(lines)


def _share(h: dict[str, Any], record: StepRecord) -> str:
    if record.kind.value in _SKIPPED:
        share = _SKIPPED[record.kind.value]
        if record.computing is not None:
            share += f" for {record.computing.count(False)} of {len(record.computing)} videos (the others computed)"
        return share
    return "/".join(
        f"{100 * h['recomputed'].get(m, 0) / h['tokens'][m]:.1f}%" if h["tokens"].get(m) else "-"
        for m in ("attn", "cross", "mlp")
    )
