"""Weights stored as int8 with one float32 scale per output row, loaded back as float32.

This is a storage format, not a runtime one: the deep testbed model (28 blocks of width 128, 15 M parameters)
is 60 MB in float32 and 15 MB this way, under the repository's 20 MB budget. A stored matrix `W` becomes `q`
(int8, `round(W / s)` clipped to [-127, 127]) and `s = max|W_row| / 127` under the key `KEY + SCALE_SUFFIX`;
loading gives `q.float() * s`, one IEEE multiply per weight, so every machine loads the very same float32
model. That dequantised model *is* the shipped one: its adherence and every benchmark figure are measured on
it, never on the float32 weights it was rounded from.

Only matrices of at least `MIN_NUMEL` entries are rounded (the linear layers of the blocks and embedders);
norms, biases, tables and small layers stay float32. `read_state_dict` dequantises on load, so any loader that
goes through it (STDiT3.from_pretrained, load_tiny, the CLI) reads both formats.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["MIN_NUMEL", "SCALE_SUFFIX", "dequantize_rows", "is_int8_rows", "quantize_rows"]

SCALE_SUFFIX = ".int8_row_scale"
MIN_NUMEL = 4096


def quantize_rows(state: Mapping[str, torch.Tensor], min_numel: int = MIN_NUMEL) -> dict[str, torch.Tensor]:
    """`state` with every float tensor of >= 2 dims and >= min_numel entries stored as int8 rows + scales."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(SCALE_SUFFIX):
            raise ValueError(f"{key}: a state dict key may not end with {SCALE_SUFFIX!r} (reserved for scales)")
        if not (value.is_floating_point() and value.ndim >= 2 and value.numel() >= min_numel):
            out[key] = value.contiguous()
            continue
        rows = value.detach().float().reshape(value.shape[0], -1)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        out[key] = torch.round(rows / scale).clamp(-127, 127).to(torch.int8).reshape(value.shape).contiguous()
        out[key + SCALE_SUFFIX] = scale.reshape(-1).contiguous()
    return out


def is_int8_rows(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether `state` holds any row-quantised tensor."""
    return any(k.endswith(SCALE_SUFFIX) for k in state)


def dequantize_rows(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The float32 state dict behind a row-quantised one (unchanged if it holds no scales).

    Raises ValueError naming `source` and the key for a scale without its int8 matrix, or one of the wrong size."""
    if not is_int8_rows(state):
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(SCALE_SUFFIX):
            weight = key[: -len(SCALE_SUFFIX)]
            if weight not in state or state[weight].dtype != torch.int8:
                raise ValueError(f"{source}: scale {key} has no int8 tensor {weight} beside it")
            continue
        scale = state.get(key + SCALE_SUFFIX)
        if scale is None:
            out[key] = value
            continue
        if scale.ndim != 1 or scale.shape[0] != value.shape[0]:
            raise ValueError(
                f"{source}: {key + SCALE_SUFFIX} has shape {tuple(scale.shape)}, expected ({value.shape[0]},)"
            )
        rows = value.reshape(value.shape[0], -1).float() * scale.float().reshape(-1, 1)
        out[key] = rows.reshape(value.shape)
    return out
