"""Peak GPU memory per cache method, counted on the meta device (no GPU, no weights).

    python -m duca_video.metrics.memory                       # 480p/720p x 2/4/16 s, every method, markdown
    python -m duca_video.metrics.memory --sizes 480p:51 --methods none,duca

How it counts (bf16 STDiT3-XL/2, 30 steps, CFG batch of 2 rows, one video):
  weights      the model's parameters and buffers (plus the VAE's and T5's, counted from their configs on meta);
  loop         the whole sampling loop runs on meta tensors through our sampler and the real cache engine; a
               dispatch mode registers every tensor storage an operator creates and frees it when the storage
               dies, so the peak of live bytes is the loop's true peak of activations + cache (+ latents),
               without allocator rounding, fragmentation or kernel workspaces. Attention is modelled as the
               fused CUDA kernels allocate it (flash, or memory-efficient with a key mask): output + fp32
               log-sum-exp, never an N x N map;
  cache        the engine's own byte accounting (`controller.cache_bytes`, peak of the sample);
  offloaded    a BOUND, not a measurement (the offload is not built): the loop's peak without the cache plus
               two blocks' worth of cache (the block being read and the one being prefetched), the largest
               per-block holding seen at any step (never more than the resident peak).
TeaCache decides from data, which meta tensors do not carry: its loop replays all-full steps (its storage does
not depend on the decisions) and its modulated-input tensor, which a replay does not store, is added by shape.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .. import cache as cache_lib
from ..cache.state import STACK
from ..cli_checks import ToolParser, name_list, positive_int
from ..models.stdit3 import STDiT3, STDiT3Config
from ..sampling.events import register_listener, unregister_listener
from .benchmark import BenchSetup, make_inputs
from .flops import video_latent_shape

# The methods whose storage a meta run can follow (`CacheConfig.unseen_bytes` is not None): every static method
# and TeaCache, from the registry; `steps` holds nothing (its memory is `none`'s).
METHODS = tuple(
    m
    for m, cls in cache_lib.METHODS.items()
    if m != "steps" and cache_lib.make_config(m).unseen_bytes(1, 1, 1, 1) is not None
)
RESOLUTIONS = {"480p": (480, 854), "720p": (720, 1280)}
SIZES = ("480p:51", "480p:102", "480p:408", "720p:51", "720p:102", "720p:408")  # 2 s, 4 s, 16 s at 24 fps
GB = 1e9


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages created under it that are still alive; `peak` is their maximum.

    `sidecar()` is read at every new peak (the cache's live bytes), so `peak_without` is the peak of the rest."""

    def __init__(self, sidecar=lambda: 0) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.outside: set[int] = set()  # storages made before the mode (weights, inputs): views of them are free
        self.current = self.peak = self.peak_without = 0
        self.sidecar = sidecar

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fresh = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        # Live bytes only grow when storages are made, so sweeping the dead ones then is enough for the peak.
        if any([self._register(t.untyped_storage()) for t in fresh]):
            self._sweep()
        return out

    def ignore(self, tensors) -> None:
        """Storages that live through the whole run and are counted elsewhere (weights, inputs)."""
        self.outside.update(t.untyped_storage()._cdata for t in tensors)

    def _register(self, storage: torch.UntypedStorage) -> bool:
        """Count `storage` if it is new; True when it was."""
        key = storage._cdata
        if key in self.outside:
            return False
        known = self.live.get(key)
        if known is not None and not known[0].expired():
            return False  # a view or an in-place result: the storage is counted once
        if known is not None:
            self.current -= known[1]
        self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.current += storage.nbytes()
        return True

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]
        if self.current > self.peak:
            self.peak = self.current
        self.peak_without = max(self.peak_without, self.current - self.sidecar())


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """What the CUDA kernels allocate: flash without a mask, memory-efficient with one (out + fp32 lse)."""
    try:
        if attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0]
        bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).expand(*q.shape[:-1], k.shape[-2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=scale)[0]
    except NotImplementedError:  # torch < 2.4 has no meta kernels for them
        return _fused_sdpa_allocations(q, v, attn_mask)


def _fused_sdpa_allocations(q: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """The tensors the two kernels return (shapes of torch's own meta kernels), allocated together as the
    kernels allocate them; the caller keeps the output only."""
    rows = tuple(q.shape[:-1])  # (B, H, L)
    out = q.new_empty(*rows, v.shape[-1])
    if attn_mask is None:  # flash: log-sum-exp per row in fp32, an RNG state of two 64-bit words
        side = [q.new_empty(rows, dtype=torch.float32), q.new_empty(2, dtype=torch.int64)]
    else:  # memory-efficient: the dense bias, log-sum-exp padded to 32 rows in fp32, seed and offset
        bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
        lse = q.new_empty(*rows[:-1], -(-rows[-1] // 32) * 32, dtype=torch.float32)
        side = [bias, lse, q.new_empty((), dtype=torch.int64), q.new_empty((), dtype=torch.int64)]
    del side
    return out


@dataclass
class _BlockPeak:
    """Sampling listener: the largest cache holding of any one block at any step boundary."""

    controller: Any
    largest: int = 0

    def on_sample_start(self, event) -> None: ...

    def on_step_start(self, event) -> None:
        state = self.controller.state
        for block in {*range(len(self.controller.blocks)), STACK}:
            held = sum(_nbytes(state.get(block, n)) for n in state.names(block))
            self.largest = max(self.largest, held)

    def on_sample_end(self) -> None:
        self.on_step_start(None)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def loop_memory(setup: BenchSetup, method: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes of one sampling loop on meta: weights, inputs, loop peak (with / without cache), cache peak, the
    largest one-block cache holding."""
    config = setup.method_config(method)
    t, h, w = setup.latent_shape
    pt, ph, pw = setup.model.patch_size
    tokens = -(-t // pt) * -(-h // ph) * -(-w // pw)
    itemsize = torch.empty((), dtype=dtype).element_size()
    extra = config.unseen_bytes(2 * setup.batch, tokens, setup.model.hidden_size, itemsize)
    if extra is None:
        raise ValueError(f"memory: {method!r} decides from the data; a meta run cannot follow its storage")
    with torch.device("meta"):
        model = STDiT3(setup.model).eval().to(dtype)
    weights = sum(_nbytes(t) for t in (*model.parameters(), *model.buffers()))
    controller = cache_lib.enable(model, config)
    if config.data_dependent:  # meta tensors carry no signal: replay all-full steps
        controller.replay_kinds = ["full"] * setup.num_steps
    blocks = _BlockPeak(controller)
    register_listener(model, blocks)
    inputs = make_inputs(setup, "meta", dtype)
    y_null = torch.empty_like(inputs["y"])
    held = sum(_nbytes(t) for t in (inputs["z"], inputs["y"], y_null, inputs["mask"]))
    tracker = LiveBytes(lambda: controller.state.live_bytes)
    tracker.ignore([*model.parameters(), *model.buffers(), inputs["z"], inputs["y"], y_null, inputs["mask"]])
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with tracker, torch.no_grad():
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
        F.scaled_dot_product_attention = original
        unregister_listener(model, blocks)
        cache_lib.disable(model)
    return {
        "weights": weights,
        "inputs": held,
        "loop_peak": tracker.peak + extra,
        "loop_peak_without_cache": tracker.peak_without,
        "cache": controller.cache_bytes + extra,
        "cache_block_max": max(blocks.largest, extra),
    }


def t5_xxl_bytes(dtype: torch.dtype = torch.float32) -> int:
    """T5 v1.1 XXL encoder (DeepFloyd/t5-v1_1-xxl) parameters, built from its config on meta."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_layers=24,
        num_heads=64,
        vocab_size=32128,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )
    with torch.device("meta"):
        model = T5EncoderModel(cfg)
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def vae_bytes(dtype: torch.dtype = torch.bfloat16) -> int:
    """Open-Sora 1.2's VAE (SDXL spatial VAE + temporal VAE), built from its config on meta."""
    from ..models.vae import OpenSoraVAE

    with torch.device("meta"):
        vae = OpenSoraVAE.from_config()
    return sum(p.numel() for p in vae.parameters()) * torch.empty((), dtype=dtype).element_size()


def memory_rows(
    sizes: list[str],
    methods: list[str],
    steps: int = 30,
    t5_dtype: torch.dtype = torch.float32,
    config: STDiT3Config | None = None,
    with_vae: bool = True,
) -> list[dict[str, Any]]:
    """One row per (size, method) with every figure in bytes."""
    t5 = t5_xxl_bytes(t5_dtype)
    vae = vae_bytes() if with_vae else 0
    rows = []
    for size in sizes:
        res, frames = size.split(":")
        image = RESOLUTIONS[res]
        setup = BenchSetup(
            model=config or STDiT3Config(),
            latent_shape=video_latent_shape(int(frames), *image),
            image_size=image,
            num_frames=int(frames),
            num_steps=steps,
        )
        for method in methods:
            m = loop_memory(setup, method)
            base = m["weights"] + vae + m["inputs"]
            freed = base + m["loop_peak"]
            # a cache smaller than two blocks would simply stay on the GPU: the bound never exceeds resident
            bound = min(freed, base + m["loop_peak_without_cache"] + 2 * m["cache_block_max"])
            rows.append(
                {
                    "size": size,
                    "method": method,
                    **m,
                    "vae": vae,
                    "t5": t5,
                    "offloaded_bound": bound,
                    "peak_t5_resident": freed + t5,
                    "peak_t5_freed": freed,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README table: GB (1e9 bytes) per size and method."""
    head = (
        "| size | method | weights (DiT + VAE) | activations | cache | peak, T5 resident | peak, T5 freed | "
        "offloaded cache (bound) |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        res, frames = r["size"].split(":")
        label = f"{res} {int(frames) / 24:.0f} s ({frames} fr)" if int(frames) >= 24 else r["size"]
        cells = [
            r["weights"] + r["vae"],
            r["loop_peak_without_cache"] + r["inputs"],
            r["cache"],
            r["peak_t5_resident"],
            r["peak_t5_freed"],
            r["offloaded_bound"],
        ]
        lines.append(f"| {label} | {r['method']} | " + " | ".join(f"{c / GB:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def _size(text: str) -> str:
    """An argparse type for one --sizes entry: RES:FRAMES, RES from RESOLUTIONS, FRAMES 1 or >= 17."""
    res, _, frames = text.strip().partition(":")
    if res not in RESOLUTIONS or not frames.isdecimal() or not (int(frames) == 1 or int(frames) >= 17):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed; allowed: RES:FRAMES with RES from "
            f"{', '.join(RESOLUTIONS)} and FRAMES 1 or >= 17 (e.g. 480p:51)"
        )
    return f"{res}:{int(frames)}"


def _sizes(text: str) -> list[str]:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: comma-separated RES:FRAMES")
    return [_size(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = ToolParser(
        prog="python -m duca_video.metrics.memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=list(SIZES),
        help="RES:FRAMES list, RES from 480p, 720p, FRAMES 1 or >= 17 (the timestep transform's range)",
    )
    p.add_argument("--methods", type=name_list(METHODS), default=list(METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument("--steps", type=positive_int, default=30)
    p.add_argument("--t5-dtype", choices=("fp32", "bf16"), default="fp32", help="T5 weights (upstream: fp32)")
    args = p.parse_args(argv)
    sizes, methods = args.sizes, args.methods
    t5_dtype = torch.float32 if args.t5_dtype == "fp32" else torch.bfloat16
    rows = memory_rows(sizes, methods, args.steps, t5_dtype)
    print(
        f"Peak GPU memory, GB (1e9 B), bf16 STDiT3-XL/2, {args.steps} steps, CFG, batch 1; T5-XXL "
        f"{args.t5_dtype} = {rows[0]['t5'] / GB:.1f} GB; counted on meta (see `python -m "
        "duca_video.metrics.memory --help` for the method); 'offloaded' is a bound, the offload is not built.\n"
    )
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
