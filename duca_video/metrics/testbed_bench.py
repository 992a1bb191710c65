"""Quality against speed on the trained testbed model (`weights/tiny`).

Every method generates the same fixed prompts and seeds (balanced over colour, shape, direction, background and
size). Per method: DiT FLOPs per clip (counted in a real run, so data-dependent methods count too), latency per
clip (methods run round-robin, median over repeats), PSNR / SSIM of the clips against `none`'s, and adherence
read from the frames (colour, direction, consistency).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import cache as cache_lib
from ..cache.variants import parse_variant
from ..testbed.adherence import adherence
from ..testbed.evaluate import balanced_prompts
from ..testbed.tiny import TinyTestbed
from .fidelity import psnr, ssim
from .flops import flop_counter


def _generate(bed: TinyTestbed, method: cache_lib.CacheConfig, prompts: list[str], seeds: list[int]):
    sampler = dataclasses.replace(bed.sampler, **method.sampler_settings())  # a variant may set e.g. fewer steps
    controller = cache_lib.enable(bed.model, method)
    try:
        return bed.generate(prompts, seeds, sampler), controller.cache_bytes
    finally:
        cache_lib.disable(bed.model)


def compare_testbed(
    bed: TinyTestbed, methods: list[str], n_prompts: int = 64, seed: int = 0, repeats: int = 1
) -> dict[str, dict[str, Any]]:
    if "none" not in methods:
        methods = ["none", *methods]
    prompts = balanced_prompts(n_prompts, seed, with_size=bed.data.caption_size)
    seeds = [seed + i for i in range(n_prompts)]
    configs = {name: parse_variant(name) for name in methods}
    results: dict[str, dict[str, Any]] = {}
    clips: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(configs) * (1 + repeats), desc="benchmark", unit="run")
    for name, config in configs.items():  # one counted run per method (also its clips and cache bytes)
        counter = flop_counter()
        with counter:
            clips[name], cache_bytes = _generate(bed, config, prompts, seeds)
        results[name] = {"tflops": counter.get_total_flops() / n_prompts / 1e12, "cache_bytes": cache_bytes}
        bar.update()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, config in configs.items():
            start = time.perf_counter()
            _generate(bed, config, prompts, seeds)
            times[name].append((time.perf_counter() - start) / n_prompts)
            bar.update()
    bar.close()
    reference = clips["none"]
    for name, r in results.items():
        metrics = adherence(clips[name], prompts)
        r.update(
            latency_s=statistics.median(times[name]),
            peak_memory_bytes=None,
            psnr_vs_none=psnr(reference, clips[name], 2.0),
            ssim_vs_none=ssim(reference, clips[name], 2.0),
            color_accuracy=metrics["colour"],
            direction_accuracy=metrics["direction"],
            shape_accuracy=metrics["shape"],
            consistency=metrics["consistency"],
        )
    base = results["none"]
    for r in results.values():
        r["flops_speedup"] = base["tflops"] / r["tflops"]
        r["latency_speedup"] = base["latency_s"] / r["latency_s"]
    return results
