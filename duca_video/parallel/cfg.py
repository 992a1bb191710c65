"""CFG parallelism, applied to the model from outside: `parallelize_cfg(model, group)`.

The sampler stays single-device code: it builds the classifier-free-guidance batch [cond; uncond] of 2B rows
and calls the model once per step. On a pair of ranks the wrapped model runs only its own half (rank 0 the
conditional rows, rank 1 the unconditional ones) and exchanges its prediction with the other rank once per step
(`cfg_exchange`, one all-gather), so both return the whole [cond; uncond] prediction. What listens to the
sampler (the cache) is told the batch it really sees: B rows without a CFG layout, and the group that holds the
other half, so decisions taken from the data (TeaCache, ...) are summed over both halves and agree.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import nn

from ..sampling.events import SampleStart, set_sample_view
from .comm import CommStats, Group, all_gather_tokens, group_rank, group_size

_ATTR = "_duca_cfg_parallel"
_ROW_ARGS = ("timestep", "y", "mask", "x_mask")  # the model's per-row arguments besides x


@dataclasses.dataclass
class CfgParallel:
    """The wrapper `parallelize_cfg` installed: this rank's half, the pair's group, the bytes it sent."""

    model: nn.Module
    group: Group
    half: int  # 0: the conditional rows, 1: the unconditional ones
    stats: CommStats = dataclasses.field(default_factory=CommStats)

    def forward(self, forward: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = x.shape[0]
        if rows % 2:
            raise ValueError(f"CFG parallelism: the model batch has {rows} rows, not a [cond; uncond] pair of halves")
        mine = slice(self.half * rows // 2, (self.half + 1) * rows // 2)
        args = tuple(_rows(a, rows, mine) for a in args)
        kwargs = {k: _rows(v, rows, mine) if k in _ROW_ARGS else v for k, v in kwargs.items()}
        out = forward(x[mine], *args, **kwargs)
        return all_gather_tokens(out.contiguous(), self.group, self.stats, "cfg_exchange").flatten(0, 1)

    def view(self, event: SampleStart) -> SampleStart:
        """What the model (and so the cache) sees of a sample: B rows, no CFG layout, the other half's group."""
        return dataclasses.replace(event, cfg=False, row_group=self.group) if event.cfg else event

    def remove(self) -> None:
        self.model.__dict__.pop("forward", None)
        self.model.__dict__.pop(_ATTR, None)
        set_sample_view(self.model, None)


def _rows(value: Any, rows: int, mine: slice) -> Any:
    """This rank's rows of a per-row tensor of the model batch (other values unchanged)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value[mine]
    return value


def parallelize_cfg(model: nn.Module, group: Group) -> CfgParallel:
    """Run the two halves of the CFG batch on the two ranks of `group`; returns the wrapper (`remove()` undoes it).
    Apply it last, over anything else that wraps the model's forward (a cache that sees the whole model call
    must see this rank's half)."""
    if group_size(group) != 2:
        raise ValueError(f"CFG parallelism needs a group of the 2 ranks of a CFG pair, it has {group_size(group)}")
    if _ATTR in model.__dict__:
        raise ValueError("CFG parallelism is already applied to this model")
    wrapper = CfgParallel(model, group, group_rank(group))
    forward = model.forward
    model.forward = functools.wraps(forward)(functools.partial(wrapper.forward, forward))
    model.__dict__[_ATTR] = wrapper
    set_sample_view(model, wrapper.view)
    return wrapper


def cfg_parallel_of(model: nn.Module) -> CfgParallel | None:
    return getattr(model, "_orig_mod", model).__dict__.get(_ATTR)


__all__ = ["CfgParallel", "cfg_parallel_of", "parallelize_cfg"]
