"""Deepen a trained STDiT3 by repeating its blocks: the warm start of the 28-block testbed model.

Trained from scratch on two CPU cores, a 28-block model learns colour but not motion within a session (3177 steps,
140 min: direction right on 1/48 prompts; the 4-block model needs 1900-2800 steps for it, at a seventh of the
cost per step). So the deep model starts from a trained shallow one of the same width: block i of the deep model
is a copy of block i * shallow_depth // depth, and every residual branch of a copy (self-attention, cross-attention
and MLP output projections) is divided by the number of copies. To first order in the branches, the k copies then
add up to the one block they came from, so the grown model starts near the shallow model's video, and training
makes the copies differ (stacking, as in progressive-depth training of transformers).

`weights/tiny28` is `weights/tiny` grown this way from 4 to 28 blocks: before any training it already drew the
caption's colour and direction on 32 of 32 prompts; 370 steps of distillation from the 4-block model then brought
its velocity error against it from 0.055 to 0.002 (scripts/train_tiny.py's docstring has the command).
"""

from __future__ import annotations

import re

import torch

# The projections whose outputs are added to the residual stream; dividing them by k divides the branch by k.
RESIDUAL_OUTPUTS = ("attn.proj", "cross_attn.proj", "mlp.fc2")
_BLOCK_KEY = re.compile(r"^(spatial_blocks|temporal_blocks)\.(\d+)\.(.+)$")


def block_depth(state: dict[str, torch.Tensor]) -> int:
    """How many spatial (= temporal) blocks a state dict holds."""
    found = {int(m.group(2)) for m in map(_BLOCK_KEY.match, state) if m and m.group(1) == "spatial_blocks"}
    if not found or found != set(range(len(found))):
        raise ValueError(f"not an STDiT3 state dict: spatial block indices {sorted(found)}")
    return len(found)


def grow_depth(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The state dict of a `depth`-block model built from `state` (a shallower STDiT3 of the same width).

    `depth` must be a multiple of the shallow depth, so every block has the same number of copies and the
    first-order argument above holds for each of them. Keys outside the blocks are kept as they are.
    """
    shallow = block_depth(state)
    if depth < shallow or depth % shallow:
        raise ValueError(f"depth {depth} is not a multiple of the source model's {shallow} blocks")
    copies = depth // shallow
    grown: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if not match:
            grown[key] = value.clone()
            continue
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        scale = 1.0 / copies if rest.rsplit(".", 1)[0] in RESIDUAL_OUTPUTS else 1.0
        for copy in range(copies):
            grown[f"{kind}.{index * copies + copy}.{rest}"] = value.clone() * scale
    return grown
