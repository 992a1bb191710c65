"""Side-by-side measurement of caching methods: FLOPs of the whole sampling loop, latency, peak memory, cache
bytes, and fidelity of each method's final latent to the uncached one.

FLOPs are counted on the meta device (no weights, no compute), for the full loop: every step, the CFG batch,
the cache's own gathers and selections included. Methods that decide from the data (TeaCache, First-Block
Cache) are counted during a real run instead (null in a FLOPs-only run).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import cache as cache_lib
from ..cache.variants import parse_variant
from ..models.stdit3 import STDiT3, STDiT3Config
from ..parallel.comm import SimulatedGroup
from ..parallel.sequence import parallelize_stdit3
from ..sampling.rflow import RFlowSampler
from .fidelity import latent_fidelity
from .flops import count_flops


@dataclass
class BenchSetup:
    model: STDiT3Config
    latent_shape: tuple[int, int, int]  # (T, H, W) of the latent
    image_size: tuple[int, int]  # the video's (H, W) in pixels (sets the position scale and timestep shift)
    num_frames: int
    num_steps: int = 30
    cfg_scale: float = 7.0
    batch: int = 1
    text_tokens: int | None = None  # valid caption tokens; None = model_max_length
    fps: float = 24.0
    use_timestep_transform: bool = True
    cache_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> field overrides

    def sampler(self, method: cache_lib.CacheConfig) -> RFlowSampler:
        """The sampler of a variant: this setup's, with the settings the variant implies (e.g. fewer steps)."""
        settings = {
            "num_sampling_steps": self.num_steps,
            "cfg_scale": self.cfg_scale,
            "use_timestep_transform": self.use_timestep_transform,
            **method.sampler_settings(),
        }
        return RFlowSampler(**settings)

    def method_config(self, name: str) -> cache_lib.CacheConfig:
        """A variant's config: `duca`, or with settings `teacache[threshold=0.2]` (see cache.variants); a plain
        method name also takes this setup's `cache_overrides` for it."""
        if "[" in name:
            return parse_variant(name)
        return cache_lib.make_config(name, **self.cache_overrides.get(name, {}))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


def make_inputs(setup: BenchSetup, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """Noise, captions and sizes for one sample batch (random captions with `text_tokens` valid tokens)."""
    cfg, b = setup.model, setup.batch
    length = cfg.model_max_length
    valid = length if setup.text_tokens is None else setup.text_tokens
    meta = torch.device(device).type == "meta"
    g = None if meta else torch.Generator().manual_seed(seed)

    def noise(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="meta") if meta else torch.randn(shape, generator=g).to(device)

    mask = torch.zeros(b, length, dtype=torch.long)
    mask[:, :valid] = 1
    return dict(
        z=noise(b, cfg.in_channels, *setup.latent_shape),
        y=noise(b, 1, length, cfg.caption_channels).to(dtype),
        mask=mask if meta else mask.to(device),  # on meta runs a CPU mask lets the sampler cut the text keys
        # Sizes stay on the CPU: their values set the position scale and the timestep shift.
        model_kwargs=dict(
            height=torch.full((b,), float(setup.image_size[0])),
            width=torch.full((b,), float(setup.image_size[1])),
            fps=torch.full((b,), setup.fps).to(device),
            num_frames=setup.num_frames,
        ),
    )


def _sample(model: STDiT3, setup: BenchSetup, method: cache_lib.CacheConfig, inputs: dict[str, Any], seed: int):
    y_null = model.y_embedder.y_embedding[None, None].expand_as(inputs["y"]).to(inputs["y"].dtype)
    return setup.sampler(method).sample(
        model,
        inputs["z"],
        inputs["y"],
        y_null,
        inputs["mask"],
        model_kwargs=inputs["model_kwargs"],
        progress=False,
        seed=seed,
    )


def loop_flops(
    setup: BenchSetup, method: str, dtype: torch.dtype = torch.bfloat16, sp_size: int = 1
) -> tuple[int | None, int | None, int | None]:
    """From one sampling loop with `method` on the meta device: its FLOPs (per rank under SP), the cache's peak
    bytes in `dtype` (per rank), and with `sp_size` > 1 the bytes the whole SP group sends (the loop plus the
    final latent gather; text and VAE traffic do not depend on the method). None where the method decides from
    real data (TeaCache; score-based selectors under SP)."""
    config = setup.method_config(method)
    if config.data_dependent:  # its decisions need real data: counted in the real run instead
        return None, None, None
    with torch.device("meta"):
        model = STDiT3(setup.model).eval().to(dtype)
    sp = None
    if sp_size > 1:
        sp = parallelize_stdit3(model, SimulatedGroup(size=sp_size), gather_output=False)
    inputs = make_inputs(setup, "meta", dtype)
    controller = cache_lib.enable(model, config)
    try:
        flops, z = count_flops(_sample, model, setup, config, inputs, 0)
    except RuntimeError:  # data-dependent on meta tensors (e.g. k-norm scores gathered under SP)
        return None, None, None
    if sp is None:
        return flops, controller.cache_bytes, None
    sp.gather_latents(z, setup.model.patch_size)
    return flops, controller.cache_bytes, sp.stats.total_bytes * sp_size


@dataclass
class RunResult:
    latent: torch.Tensor
    latency_s: float
    peak_memory_bytes: int | None
    cache_bytes: int
    flops: int | None = None


def run_method(
    model: STDiT3, setup: BenchSetup, method: str, inputs: dict[str, Any], seed: int = 0, count: bool = False
) -> RunResult:
    """Generate once with `method` (timed); optionally count its FLOPs in one more run."""
    config = setup.method_config(method)
    controller = cache_lib.enable(model, config)
    device = inputs["z"].device
    cuda = device.type == "cuda"
    peak = None
    try:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        latent = _sample(model, setup, config, inputs, seed)
        if cuda:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        elapsed = time.perf_counter() - start
        flops = count_flops(_sample, model, setup, config, inputs, seed)[0] if count else None
        return RunResult(latent.float().cpu(), elapsed, peak, controller.cache_bytes, flops)
    finally:
        cache_lib.disable(model)


def compare(
    setup: BenchSetup,
    methods: list[str],
    model: STDiT3 | None = None,
    flops_only: bool = False,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 1,
    seed: int = 0,
    warmup: bool = True,
    sp_sizes: tuple[int, ...] = (),
) -> dict[str, dict[str, Any]]:
    """The per-method records (`scripts/benchmark.py --json`). Without a model, one with random weights (seeded)
    is built."""
    if "none" not in methods:
        methods = ["none", *methods]
    results = {name: _counted(setup, name, dtype, sp_sizes) for name in methods}
    if not flops_only:
        if model is None:
            torch.manual_seed(seed)
            model = STDiT3(setup.model).eval()
        model = model.to(device=device, dtype=dtype)
        runs = _timed_runs(setup, methods, model, make_inputs(setup, device, dtype, seed), repeats, seed, warmup)
        reference = runs["none"][0].latent
        for name, done in runs.items():
            results[name].update(_measured(done, reference))
    base = results["none"]
    for r in results.values():
        if r["tflops"] and base["tflops"]:
            r["flops_speedup"] = base["tflops"] / r["tflops"]
        if r["latency_s"] and base["latency_s"]:
            r["latency_speedup"] = base["latency_s"] / r["latency_s"]
    return results


def _counted(setup: BenchSetup, name: str, dtype: torch.dtype, sp_sizes: tuple[int, ...]) -> dict[str, Any]:
    """A method's record with what is counted on meta: FLOPs, cache bytes, bytes sent per SP size."""
    flops, cache_bytes, _ = loop_flops(setup, name, dtype)
    record: dict[str, Any] = {
        "tflops": None if flops is None else flops / 1e12,
        "flops_speedup": None,
        "latency_s": None,
        "latency_speedup": None,
        "peak_memory_bytes": None,
        "cache_bytes": cache_bytes,
        "psnr_vs_none": None,
        "ssim_vs_none": None,
    }
    if sp_sizes:  # bytes sent per video by the whole SP group, keyed by SP size
        record["comm_bytes"] = {str(p): loop_flops(setup, name, dtype, p)[2] for p in sp_sizes}
    return record


def _timed_runs(
    setup: BenchSetup, methods: list[str], model: STDiT3, inputs: Any, repeats: int, seed: int, warmup: bool
) -> dict[str, list[RunResult]]:
    if warmup:  # first-call costs (allocator, kernels) must not land on the first method
        run_method(model, BenchSetup(**{**setup.__dict__, "num_steps": 1}), "none", inputs, seed=seed)
    # Round-robin over methods, so a load change on the machine hits every method alike; median per method.
    runs: dict[str, list[RunResult]] = {name: [] for name in methods}
    for rep in range(repeats):
        for name in methods:
            dynamic = setup.method_config(name).data_dependent
            runs[name].append(run_method(model, setup, name, inputs, seed=seed, count=dynamic and rep == 0))
    return runs


def _measured(done: list[RunResult], reference: torch.Tensor) -> dict[str, Any]:
    """What the timed runs of one method measured: the median latency, the peak, the first run's fidelity."""
    first = done[0]
    fid = latent_fidelity(reference, first.latent)
    peaks = [r.peak_memory_bytes for r in done if r.peak_memory_bytes is not None]
    out = {
        "latency_s": statistics.median(r.latency_s for r in done),
        "peak_memory_bytes": max(peaks) if peaks else None,
        "cache_bytes": first.cache_bytes,
        "psnr_vs_none": fid["psnr"],
        "ssim_vs_none": fid["ssim"],
    }
    if first.flops is not None:
        out["tflops"] = first.flops / 1e12
    return out


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of the records (adherence columns when the testbed benchmark measured them)."""

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    columns = [
        ("tflops", "TFLOPs", ".4g", 1),
        ("flops_speedup", "FLOPs x", ".2f", 1),
        ("latency_s", "latency s", ".3f", 1),
        ("latency_speedup", "lat. x", ".2f", 1),
        ("peak_memory_bytes", "peak MiB", ".0f", 2**20),
        ("cache_bytes", "cache MiB", ".1f", 2**20),
        ("psnr_vs_none", "PSNR", ".2f", 1),
        ("ssim_vs_none", "SSIM", ".4f", 1),
        ("color_accuracy", "colour", ".3f", 1),
        ("direction_accuracy", "direction", ".3f", 1),
        ("cond_psnr_vs_none", "i2v PSNR", ".2f", 1),
        ("cond_kept_psnr", "kept PSNR", ".2f", 1),
    ]
    present = [c for c in columns if any(c[0] in r for r in results.values())]
    width = max([13, *(len(name) + 1 for name in results)])
    lines = [f"{'method':<{width}}" + "".join(f"{title:>11}" for _, title, _, _ in present)]
    for name, r in results.items():
        cells = [fmt(None if r.get(k) is None else r[k] / div, spec) for k, _, spec, div in present]
        lines.append(f"{name:<{width}}" + "".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)
