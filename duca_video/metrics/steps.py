"""Per-step costs of one sampling loop, counted on the meta device: FLOPs and sequence-parallel bytes per step.

The scaling model (`scaling.py`) needs to know, for each step of a method's loop, how much work it does and
whether it talks to the other ranks. Both are read off the real code: the loop runs on meta tensors through
our sampler, the cache engine and (with `sp_size` > 1) our sequence parallelism over a simulated group, and a
sampling listener takes the FLOP counter's and the byte counter's totals at every step boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import cache as cache_lib
from ..models.stdit3 import STDiT3, STDiT3Config
from ..parallel.comm import SimulatedGroup
from ..parallel.sequence import parallelize_stdit3
from ..sampling.events import SampleStart, StepStart, register_listener, unregister_listener
from .benchmark import BenchSetup, make_inputs
from .flops import count_flops, meta_inputs


@dataclass
class StepCost:
    kind: str  # full | conservative | aggressive (the cache engine's own record of the step)
    flops: int  # per rank
    bytes_sent: int  # per rank, by the sequence-parallel collectives of this step


@dataclass
class _StepRecorder:
    """A sampling listener that cuts the counters' running totals into steps."""

    counter: object
    sp: object | None
    marks: list[tuple[int, int]] = field(default_factory=list)

    def _mark(self) -> None:
        sent = 0 if self.sp is None else self.sp.stats.total_bytes
        self.marks.append((int(self.counter.get_total_flops()), int(sent)))

    def on_sample_start(self, event: SampleStart) -> None:
        self.marks.clear()

    def on_step_start(self, event: StepStart) -> None:
        self._mark()

    def on_sample_end(self) -> None:
        self._mark()


def loop_steps(setup: BenchSetup, method: str, dtype: torch.dtype = torch.bfloat16, sp_size: int = 1) -> list[StepCost]:
    """Each step of one sampling loop of `method` (CFG batch included) with its FLOPs and bytes per rank.

    Data-dependent methods (TeaCache) have no fixed step list: ValueError."""
    from .flops import flop_counter

    config = setup.method_config(method)
    if config.data_dependent:
        raise ValueError(f"cache method {method!r} decides its steps from the data: it has no counted step list")
    with torch.device("meta"):
        model = STDiT3(setup.model).eval().to(dtype)
    sp = parallelize_stdit3(model, SimulatedGroup(sp_size), gather_output=False) if sp_size > 1 else None
    controller = cache_lib.enable(model, config)
    counter = flop_counter()
    recorder = _StepRecorder(counter, sp)
    register_listener(model, recorder)  # after the cache's listener: the step's kind is set when we mark
    inputs = make_inputs(setup, "meta", dtype)
    y_null = torch.empty_like(inputs["y"])
    try:
        with counter, torch.no_grad():
            setup.sampler(config).sample(
                model,
                inputs["z"],
                inputs["y"],
                y_null,
                inputs["mask"],
                model_kwargs=inputs["model_kwargs"],
                progress=False,
                seed=0,
            )
    finally:
        unregister_listener(model, recorder)
    kinds = [h["kind"] for h in controller.history] if controller.history else ["full"] * (len(recorder.marks) - 1)
    marks = recorder.marks
    return [
        StepCost(kind, marks[i + 1][0] - marks[i][0], marks[i + 1][1] - marks[i][1]) for i, kind in enumerate(kinds)
    ]


def forward_cost(
    config: STDiT3Config,
    latent_shape: tuple[int, int, int],
    image_size: tuple[int, int],
    rows: int,
    sp_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    text_tokens: int | None = None,
) -> tuple[int, int]:
    """(FLOPs, bytes sent) per rank of one uncached forward of `rows` model rows, SP over `sp_size` ranks."""
    with torch.device("meta"):
        model = STDiT3(config).eval().to(dtype)
    sp = parallelize_stdit3(model, SimulatedGroup(sp_size), gather_output=False) if sp_size > 1 else None
    inputs = meta_inputs(config, latent_shape, rows, image_size, text_tokens)
    inputs["x"], inputs["y"] = inputs["x"].to(dtype), inputs["y"].to(dtype)
    flops, _ = count_flops(model, **inputs)
    return int(flops), (0 if sp is None else sp.stats.total_bytes)


def ulysses_bytes_per_forward(
    config: STDiT3Config, latent_shape: tuple[int, int, int], rows: int, sp_size: int, dtype_bytes: int = 2
) -> int:
    """Bytes one rank sends in one forward, from the shapes of our Ulysses attention (parallel/sequence.py):
    per spatial block an all-to-all of the stacked q, k, v of my tokens (rows*T, s_local, 3, heads, d) and one
    of the attention output for my heads (rows*T, S_padded, heads/p, d); each keeps 1/p of its data.
    Temporal and cross-attention, the MLP and the final layer are local (no bytes)."""
    p = sp_size
    if p <= 1:
        return 0
    t, h, w = latent_shape
    _, ph, pw = config.patch_size
    s = -(-h // ph) * -(-w // pw)
    s_local = -(-s // p)
    c = config.hidden_size
    qkv = rows * t * s_local * 3 * c * dtype_bytes
    out = rows * t * s_local * c * dtype_bytes  # (S_padded / p) * heads * d = s_local * C per row
    return config.depth * (qkv * (p - 1) // p + out * (p - 1) // p)
