"""torch.compile with the cache: compile the blocks' modules, keep the cache's Python outside the graphs.

    controller = duca_video.cache.enable(model, "duca")
    duca_video.cache.compile_blocks(model)          # each block's attention, cross-attention and MLP, in place

Why this split: a cached step runs the same modules as a full step on fewer tokens (a conservative step's
selected rows) or not at all (a reused module). So each module sees one static shape per step kind, and its
compiled graphs are made once and reused by every later step of that kind. The cache's own code (the schedule,
a method's decisions, the store) is kept out of tracing (`keep_out_of_tracing`): traced, its per-step state would
become guards and recompile the model at every step. `torch.compile(model)` on top (for the embedding and the
output layer) is safe: the blocks are graph breaks in it.

Works on our STDiT3 and on upstream's (the same attribute names), with or without the cache (call it before or
after `enable`). Attention modules that sequence parallelism wrapped (their `forward` replaced by the
all-to-all wrapper of `parallel.sequence`) are left eager: tracing the collectives is not supported here.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .structure import find_blocks

COMPILED_MODULES = ("attn", "cross_attn", "mlp")


def compile_blocks(model: nn.Module, **options: Any) -> list[str]:
    """Compile every block's `attn`, `cross_attn` and `mlp` in place (`nn.Module.compile`); `options` go to
    `torch.compile` (default `dynamic=False`: one graph per shape, and the shapes are static per step kind).
    Returns the names of the modules compiled."""
    if not hasattr(nn.Module, "compile"):
        raise RuntimeError("compile_blocks needs torch >= 2.2 (nn.Module.compile)")
    options = {"dynamic": False, **options}
    names = {id(m): n for n, m in model.named_modules()}
    compiled = []
    for block in find_blocks(model):
        for attr in COMPILED_MODULES:
            module = getattr(block, attr)
            if "forward" in module.__dict__:  # wrapped by sequence parallelism: stays eager
                continue
            module.compile(**options)
            compiled.append(names.get(id(module), attr))
    prepare_compile(model)  # an installed cache's Python stays out of the traced graphs
    return compiled


def keep_out_of_tracing(fn: Any) -> Any:
    """`fn` kept out of torch.compile's tracing (it runs as Python between the compiled graphs), when compiling
    is in use in this process (torch._dynamo imported). Marking needs torch._dynamo, whose import costs ~70 MiB
    and ~1 s: a run that never compiles does not pay it (`prepare_compile` marks an installed cache later)."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return fn if disable is None or "torch._dynamo" not in sys.modules else disable(fn)


def prepare_compile(model: nn.Module) -> None:
    """Keep the cache enabled on `model` out of torch.compile's tracing: call it before `torch.compile(model)`
    when the cache was enabled before torch._dynamo was imported (`compile_blocks` calls it)."""
    import torch._dynamo  # noqa: F401 - what marking a function as eager needs

    from .plugin import controller_of  # the plugin installs with keep_out_of_tracing

    controller = controller_of(model)
    if controller is not None:
        controller.remove()
        controller.install()


__all__ = ["COMPILED_MODULES", "compile_blocks", "keep_out_of_tracing", "prepare_compile"]
