"""Process groups for multi-GPU inference: `torchrun` + ColossalAI's launch and (data x sequence) mesh.

With W processes and an SP size p (default: all of them, as Open-Sora), there are W / p data-parallel groups
of p ranks each; a group's ranks split one video's tokens, and different groups generate different prompts.
Without torchrun everything degrades to one process and no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    world_size: int = 1
    rank: int = 0
    sp_size: int = 1
    sp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    sp_group: Any = None  # torch.distributed.ProcessGroup over the ranks of my SP group
    dp_group: Any = None  # ranks with the same sp_rank across data-parallel groups

    @property
    def is_writer(self) -> bool:
        """One rank per SP group writes that group's files."""
        return self.sp_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_parallel(sp_size: int | None = None, backend: str | None = None) -> ParallelContext:
    """Start the process groups (once) and build the (dp, sp) mesh. sp_size None = the whole world."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        if sp_size not in (None, 1):
            raise ValueError(f"--sp-size {sp_size} needs {sp_size} processes: launch with torchrun --nproc_per_node")
        return ParallelContext()
    world = int(os.environ["WORLD_SIZE"])
    sp = world if sp_size is None else sp_size
    if sp < 1 or world % sp:
        allowed = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(f"--sp-size {sp} does not divide the world size {world}; allowed: {allowed}")
    if not dist.is_initialized():
        import colossalai  # imported here: single-process runs never need it

        colossalai.launch_from_torch(backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    from colossalai.cluster import ProcessGroupMesh

    mesh = ProcessGroupMesh(world // sp, sp)  # axis 0: data parallel, axis 1: sequence parallel
    rank = dist.get_rank()
    dp_rank, sp_rank = mesh.coordinate()
    return ParallelContext(world_size=world, rank=rank, sp_size=sp, sp_rank=sp_rank, dp_size=world // sp,
                           dp_rank=dp_rank, sp_group=mesh.get_group_along_axis(1),
                           dp_group=mesh.get_group_along_axis(0))  # fmt: skip
