"""Every collective of sequence-parallel inference, named and counted.

There are three, and this is the only file that calls torch.distributed during sampling:
  - `seq_to_heads`:  all-to-all before spatial self-attention: each rank gives away the heads it will not
                     compute and receives every rank's tokens for the heads it keeps;
  - `heads_to_seq`:  the inverse all-to-all after attention;
  - `all_reduce_sum`: a few scalars that must agree across ranks (TeaCache's decision signal);
  - `all_gather_tokens`: per-token scores and, once per sample, the final latent shards.
A group can be simulated (`SimulatedGroup`): shapes and byte counts as for a real group of that size, with no
process group at all, so the traffic of an N-GPU run can be counted on the meta device on one machine.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Calls and bytes sent by this rank, per collective."""

    calls: Counter = field(default_factory=Counter)
    bytes_sent: Counter = field(default_factory=Counter)

    def add(self, name: str, sent: int) -> None:
        self.calls[name] += 1
        self.bytes_sent[name] += sent

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


@dataclass
class SimulatedGroup:
    """Stands in for a process group of `size` ranks, seen from rank `rank` (byte counting only)."""

    size: int
    rank: int = 0


Group = Union[dist.ProcessGroup, SimulatedGroup, None]


def group_size(group: Group) -> int:
    if isinstance(group, SimulatedGroup):
        return group.size
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group: Group) -> int:
    if isinstance(group, SimulatedGroup):
        return group.rank
    return dist.get_rank(group) if dist.is_initialized() else 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _all_to_all(x: torch.Tensor, group: Group, stats: CommStats, name: str) -> torch.Tensor:
    """x (p, ...) chunk i goes to rank i; returns (p, ...) with chunk j from rank j."""
    p = x.shape[0]
    stats.add(name, _nbytes(x) * (p - 1) // p)
    if isinstance(group, SimulatedGroup):
        return x.clone()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


def seq_to_heads(x: torch.Tensor, group: Group, stats: CommStats) -> torch.Tensor:
    """(N, s_loc, k, heads, d) local tokens, all heads -> (N, p * s_loc, k, heads / p, d) all tokens, my heads."""
    p = group_size(group)
    n, s_loc, k, heads, d = x.shape
    chunks = x.view(n, s_loc, k, p, heads // p, d).permute(3, 0, 1, 2, 4, 5)  # (p, N, s_loc, k, h/p, d)
    got = _all_to_all(chunks.contiguous(), group, stats, "seq_to_heads")  # chunk j: rank j's tokens
    return got.permute(1, 0, 2, 3, 4, 5).reshape(n, p * s_loc, k, heads // p, d)


def heads_to_seq(x: torch.Tensor, group: Group, stats: CommStats) -> torch.Tensor:
    """(N, p * s_loc, heads / p, d) all tokens, my heads -> (N, s_loc, heads, d) my tokens, all heads."""
    p = group_size(group)
    n, s_all, h_loc, d = x.shape
    chunks = x.view(n, p, s_all // p, h_loc, d).permute(1, 0, 2, 3, 4)  # chunk i: rank i's tokens
    got = _all_to_all(chunks.contiguous(), group, stats, "heads_to_seq")  # chunk j: heads of rank j
    return got.permute(1, 2, 0, 3, 4).reshape(n, s_all // p, p * h_loc, d)


def all_gather_tokens(x: torch.Tensor, group: Group, stats: CommStats, name: str = "all_gather") -> torch.Tensor:
    """Concatenate every rank's x along a new leading dim: (p, *x.shape)."""
    p = group_size(group)
    stats.add(name, _nbytes(x) * (p - 1))
    if isinstance(group, SimulatedGroup):
        return x.unsqueeze(0).expand(p, *x.shape).clone()
    parts = [torch.empty_like(x) for _ in range(p)]
    dist.all_gather(parts, x.contiguous(), group=group)  # the list form: gloo has no all_gather_into_tensor
    return torch.stack(parts)


def all_reduce_sum(x: torch.Tensor, group: Group, stats: CommStats, name: str = "all_reduce") -> torch.Tensor:
    p = group_size(group)
    stats.add(name, _nbytes(x) * 2 * (p - 1) // p)
    if isinstance(group, SimulatedGroup):
        return x * p
    out = x.clone()
    dist.all_reduce(out, group=group)
    return out
