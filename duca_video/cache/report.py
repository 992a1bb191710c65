"""The controller's text summary of a sample: one line per step."""

from __future__ import annotations

from typing import Any

from .config import CacheConfig

_SKIPPED = {"aggressive": "stack reused", "first_block": "first block computed, rest reused", "mixed": "stack reused"}


def summary_text(config: CacheConfig, history: list[dict[str, Any]], cache_bytes: int) -> str:
    """What each step did (C = computed, R = reused, P = partly recomputed; for attn / cross / mlp of the
    spatial and temporal blocks) and the share of tokens recomputed per module."""
    header = f"{'step':>4} {'t':>8}  {'kind':<12} {'spatial':<8} {'temporal':<8} recomputed (attn/cross/mlp)"
    lines = [f"cache method {config.method}: {config.to_dict()}", header]
    counts: dict[str, int] = {}
    for h in history:
        kind, _, bits = h["kind"].partition(":")
        counts[kind] = counts.get(kind, 0) + 1
        lines.append(
            f"{h['step']:>4} {h['t']:>8.2f}  {h['kind']:<12} {h['spatial']:<8} {h['temporal']:<8} "
            f"{_share(h, kind, bits)}"
        )
    lines.append(f"steps: {counts}; peak cache {cache_bytes / 2**20:.1f} MiB")
    return "\n".join(lines)


def _share(h: dict[str, Any], kind: str, bits: str) -> str:
    if kind in _SKIPPED:
        share = _SKIPPED[kind]
        if bits:
            share += f" for {bits.count('0')} of {len(bits)} videos (the others computed)"
        return share
    return "/".join(
        f"{100 * h['recomputed'].get(m, 0) / h['tokens'][m]:.1f}%" if h["tokens"].get(m) else "-"
        for m in ("attn", "cross", "mlp")
    )
