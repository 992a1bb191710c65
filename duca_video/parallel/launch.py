"""Process groups for multi-GPU inference: `torchrun` + ColossalAI's launch and a (data x cfg x sequence) mesh.

With W processes, an SP size p (default: all of them, as Open-Sora) and CFG parallelism c (1, or 2 with
`--cfg-parallel`), there are W / (c p) data-parallel groups of c p ranks each: the *video group*. Within it, the
c halves of classifier-free guidance (the conditional and the unconditional rows) run on different ranks and
exchange their predictions once per step, and each half's p ranks split the video's tokens. Different video
groups generate different prompts. Without torchrun everything degrades to one process and no group at all.
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
    dp_group: Any = None  # ranks with the same (cfg, sp) coordinate across data-parallel groups
    cfg_size: int = 1  # 2 with CFG parallelism: the two halves of the guidance batch on two ranks
    cfg_rank: int = 0  # 0: the conditional rows, 1: the unconditional ones
    cfg_group: Any = None  # my CFG pair (None without CFG parallelism)
    video_group: Any = None  # every rank that works on my videos (cfg x sp); None: the SP group

    @property
    def is_writer(self) -> bool:
        """One rank per video group writes that group's files."""
        return self.sp_rank == 0 and self.cfg_rank == 0

    @property
    def group(self) -> Any:
        """The video group (text broadcast, agreement on what to generate)."""
        return self.video_group if self.video_group is not None else self.sp_group

    @property
    def group_size(self) -> int:
        return self.sp_size * self.cfg_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_parallel(
    sp_size: int | None = None, backend: str | None = None, cfg_parallel: bool = False
) -> ParallelContext:
    """Start the process groups (once) and build the (dp, cfg, sp) mesh. sp_size None = every rank of a CFG half."""
    cfg = 2 if cfg_parallel else 1
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        if sp_size not in (None, 1) or cfg_parallel:
            need = (sp_size or 1) * cfg
            raise ValueError(f"{'--cfg-parallel' if cfg_parallel else f'--sp-size {sp_size}'} needs {need} "
                             "processes: launch with torchrun --nproc_per_node")  # fmt: skip
        return ParallelContext()
    world = int(os.environ["WORLD_SIZE"])
    if world % cfg:
        raise ValueError(f"--cfg-parallel puts the two CFG halves on two ranks: the world size {world} must be even")
    sp = world // cfg if sp_size is None else sp_size
    if sp < 1 or world % (sp * cfg):
        allowed = [d for d in range(1, world // cfg + 1) if (world // cfg) % d == 0]
        what = f"{world} / 2 (CFG halves)" if cfg > 1 else f"the world size {world}"
        raise ValueError(f"--sp-size {sp} does not divide {what}; allowed: {allowed}")
    if not dist.is_initialized():
        import colossalai  # imported here: single-process runs never need it

        colossalai.launch_from_torch(backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    from colossalai.cluster import ProcessGroupMesh

    rank = dist.get_rank()
    if cfg == 1:
        mesh = ProcessGroupMesh(world // sp, sp)  # axis 0: data parallel, axis 1: sequence parallel
        dp_rank, sp_rank = (int(c) for c in mesh.coordinate())
        return ParallelContext(world_size=world, rank=rank, sp_size=sp, sp_rank=sp_rank, dp_size=world // sp,
                               dp_rank=dp_rank, sp_group=mesh.get_group_along_axis(1),
                               dp_group=mesh.get_group_along_axis(0))  # fmt: skip
    mesh = ProcessGroupMesh(world // (cfg * sp), cfg, sp)  # axes: data parallel, CFG half, sequence parallel
    dp_rank, cfg_rank, sp_rank = (int(c) for c in mesh.coordinate())  # numpy ints otherwise
    return ParallelContext(world_size=world, rank=rank, sp_size=sp, sp_rank=sp_rank, dp_size=world // (cfg * sp),
                           dp_rank=dp_rank, sp_group=mesh.get_group_along_axis(2),
                           dp_group=mesh.get_group_along_axis(0), cfg_size=cfg, cfg_rank=cfg_rank,
                           cfg_group=mesh.get_group_along_axis(1), video_group=mesh.get_group_along_axis([1, 2]))


def close_parallel(exit_code: int = 0) -> None:
    """End the process groups before the interpreter exits: left to exit alone, a gloo group's background
    threads can abort the process ("terminate called without an active exception", exit -6) after the work is
    done. Every rank waits for the others first, unless the job was interrupted (130: some may be gone)."""
    if not dist.is_available() or not dist.is_initialized():
        return
    if exit_code != 130:
        dist.barrier()
    dist.destroy_process_group()
