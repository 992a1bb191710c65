"""Where the cache attaches: an STDiT3's blocks (ours or upstream's, by Open-Sora's attribute names) and the
caption rows of the videos that compute a step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BLOCK_ATTRS = ("attn", "cross_attn", "mlp", "norm1", "norm2", "scale_shift_table", "temporal")


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """STDiT3 blocks in execution order (spatial 0, temporal 0, spatial 1, ...)."""
    if hasattr(model, "spatial_blocks") and hasattr(model, "temporal_blocks"):
        pairs = zip(model.spatial_blocks, model.temporal_blocks)
        blocks = [b for pair in pairs for b in pair]
    else:
        blocks = [m for m in model.modules() if all(hasattr(m, a) for a in BLOCK_ATTRS)]
    missing = [a for a in BLOCK_ATTRS if blocks and not hasattr(blocks[0], a)]
    if not blocks or missing:
        raise ValueError(
            f"{type(model).__name__} has no STDiT3 blocks: the cache needs blocks with attributes {BLOCK_ATTRS}"
        )
    return blocks


def caption_rows(sample: Any, y: torch.Tensor, mask: Any) -> tuple[torch.Tensor, Any]:
    """The captions (and mask) of the rows that compute this step: rows of ours, or the pieces of upstream's
    packed caption sequence (1, sum of lengths, C), whose mask is each row's length."""
    rows = sample.now.compute_rows
    if y.shape[0] == sample.rows:
        return y.index_select(0, rows), None if mask is None else mask.index_select(0, rows)
    lengths = [int(v) for v in mask]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    pieces = [y[:, starts[i] : starts[i] + lengths[i]] for i in sample.now.compute_list]
    return torch.cat(pieces, dim=1), [lengths[i] for i in sample.now.compute_list]
