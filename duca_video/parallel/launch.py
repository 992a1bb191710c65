"""Process groups for multi-GPU inference: `torchrun` + a (data x cfg x sequence) mesh of our own groups.

With W processes, an SP size p (default: all of them, as Open-Sora) and CFG parallelism c (1, or 2 with
`--cfg-parallel`), there are W / (c p) data-parallel groups of c p ranks each: the *video group*. Within it, the
c halves of classifier-free guidance (the conditional and the unconditional rows) run on different ranks and
exchange their predictions once per step, and each half's p ranks split the video's tokens. Different video
groups generate different prompts. Without torchrun everything degrades to one process and no group at all.
"""

from __future__ import annotations

import inspect
import os
import sys
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


@dataclass(frozen=True)
class ParallelDims:
    """The (data x cfg x sequence) layout of `world` ranks, validated on construction. Rank r sits at the
    row-major coordinate (dp, cfg, sp) of the shape (dp, cfg, sp): a video group's ranks are consecutive."""

    world: int
    sp: int
    cfg: int = 1

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg size must be 1 or 2, got {self.cfg}")
        if self.world % self.cfg:
            raise ValueError(
                f"--cfg-parallel puts the two CFG halves on two ranks: the world size {self.world} must be even"
            )
        per_half = self.world // self.cfg
        if self.sp < 1 or per_half % self.sp:
            allowed = [d for d in range(1, per_half + 1) if per_half % d == 0]
            what = f"{self.world} / 2 (CFG halves)" if self.cfg > 1 else f"the world size {self.world}"
            raise ValueError(f"--sp-size {self.sp} does not divide {what}; allowed: {allowed}")

    @property
    def dp(self) -> int:
        return self.world // (self.cfg * self.sp)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dp, self.cfg, self.sp)

    def coordinate(self, rank: int) -> tuple[int, int, int]:
        return (rank // (self.cfg * self.sp), rank // self.sp % self.cfg, rank % self.sp)

    def groups_along(self, axes: tuple[int, ...]) -> list[list[int]]:
        """Every group of ranks that differ only along `axes` (0: data, 1: cfg, 2: sequence), in rank order."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world):
            fixed = tuple(c for axis, c in enumerate(self.coordinate(rank)) if axis not in axes)
            groups.setdefault(fixed, []).append(rank)
        return list(groups.values())


def _new_group_along(dims: ParallelDims, axes: tuple[int, ...], rank: int) -> Any:
    """torch.distributed groups along `axes`; every rank creates all of them in one order (new_group is
    collective), and keeps its own."""
    mine = None
    for ranks in dims.groups_along(axes):
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def _launch(backend: str) -> None:
    """Join torchrun's processes: through ColossalAI's launcher where the installed version can (0.3.7 needs a
    `config` and builds a `tcp://[host]:port` address that Python 3.11+ refuses for a host name), else with
    torch's own env:// rendezvous, which is what both launchers do underneath."""
    try:
        import colossalai  # imported here: single-process runs never need it
    except ImportError:
        colossalai = None
    params = inspect.signature(colossalai.launch_from_torch).parameters if colossalai else {}
    if colossalai is not None and ("config" not in params or sys.version_info < (3, 11)):
        colossalai.launch_from_torch(backend=backend, verbose=False, **({"config": {}} if "config" in params else {}))
    else:
        dist.init_process_group(backend=backend, init_method="env://")


def init_parallel(
    sp_size: int | None = None, backend: str | None = None, cfg_parallel: bool = False
) -> ParallelContext:
    """Start the process groups (once) and build the (dp, cfg, sp) mesh. sp_size None = every rank of a CFG half."""
    cfg = 2 if cfg_parallel else 1
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        if sp_size not in (None, 1) or cfg_parallel:
            need = (sp_size or 1) * cfg
            raise ValueError(
                f"{'--cfg-parallel' if cfg_parallel else f'--sp-size {sp_size}'} needs {need} "
                "processes: launch with torchrun --nproc_per_node"
            )
        return ParallelContext()
    world = int(os.environ["WORLD_SIZE"])
    dims = ParallelDims(world, sp_size if sp_size is not None else max(1, world // cfg), cfg)
    if not dist.is_initialized():
        _launch(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank = dist.get_rank()
    dp_rank, cfg_rank, sp_rank = dims.coordinate(rank)
    ctx = ParallelContext(
        world_size=world,
        rank=rank,
        sp_size=dims.sp,
        sp_rank=sp_rank,
        dp_size=dims.dp,
        dp_rank=dp_rank,
        sp_group=_new_group_along(dims, (2,), rank),
        dp_group=_new_group_along(dims, (0,), rank),
    )
    if cfg > 1:  # the CFG pair, and the video group (cfg x sp) it belongs to
        ctx.cfg_size, ctx.cfg_rank = cfg, cfg_rank
        ctx.cfg_group = _new_group_along(dims, (1,), rank)
        ctx.video_group = _new_group_along(dims, (1, 2), rank)
    return ctx


def close_parallel(exit_code: int = 0) -> None:
    """End the process groups before the interpreter exits: left to exit alone, a gloo group's background
    threads can abort the process ("terminate called without an active exception", exit -6) after the work is
    done. Every rank waits for the others first, unless the job was interrupted (130: some may be gone)."""
    if not dist.is_available() or not dist.is_initialized():
        return
    if exit_code != 130:
        dist.barrier()
    dist.destroy_process_group()
