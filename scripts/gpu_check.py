"""One-shot GPU check: STDiT3-XL/2 with random bf16 weights at 480p, 51 frames, 30 steps with CFG, for the
uncached loop and every cache method. Under 8 minutes on one H200. Writes one JSON summary.

    python scripts/gpu_check.py --out gpu_check.json          # needs CUDA
    python scripts/gpu_check.py --tiny --out tiny.json        # the same code on a tiny config, CPU, seconds

Per method: the time of each step (CUDA events on a GPU, perf_counter on a CPU) summarised per step kind
(full / conservative / aggressive), `torch.cuda.max_memory_allocated`, the cache's bytes. Then: which SDPA
kernel each attention call of a real forward ran (read from the profiler's operator names, by site) and the
probe of duca_video.models.sdpa_probe; the sync check (`torch.cuda.set_sync_debug_mode("error")` around a
cached loop, from its first step and from its second, with the failing operation when one syncs); bf16 against
fp32 on a small forward. `python -m duca_video.metrics.scaling --kernel-times OUT` reads the JSON.
The JSON is rewritten after every part, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from duca_video import cache as cache_lib
from duca_video.cli_checks import ArgError, ToolParser, name_list, nonempty, output_file, positive_int
from duca_video.metrics.benchmark import BenchSetup, make_inputs
from duca_video.metrics.flops import video_latent_shape
from duca_video.models import STDiT3, STDiT3Config
from duca_video.sampling.events import register_listener, unregister_listener

# Every method of the registry but `steps` (a sampler setting: it is `none` with fewer steps).
METHODS = tuple(m for m in cache_lib.METHODS if m != "steps")
TINY = STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class StepClock:
    """Sampling listener: a timestamp at every step boundary (CUDA events on a GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def _mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def on_sample_start(self, event) -> None:
        self.marks.clear()

    def on_step_start(self, event) -> None:
        self._mark()

    def on_sample_end(self) -> None:
        self._mark()

    def step_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def build_setup(tiny: bool, steps: int | None, text_tokens: int | None) -> BenchSetup:
    """The check's setup; None takes the default (tiny: 10 steps, 4 tokens; else 30 steps, 60 tokens)."""
    if tiny:
        return BenchSetup(
            model=TINY,
            latent_shape=(3, 8, 10),
            image_size=(64, 80),
            num_frames=9,
            text_tokens=4 if text_tokens is None else text_tokens,
            num_steps=10 if steps is None else steps,
            cfg_scale=4.0,
            use_timestep_transform=False,
        )
    return BenchSetup(
        model=STDiT3Config(),
        latent_shape=video_latent_shape(51, 480, 854),
        image_size=(480, 854),
        num_frames=51,
        num_steps=30 if steps is None else steps,
        text_tokens=60 if text_tokens is None else text_tokens,
    )


def sample(model: STDiT3, setup: BenchSetup, method: str, inputs: dict[str, Any]) -> torch.Tensor:
    config = setup.method_config(method)
    y_null = model.y_embedder.y_embedding[None, None].expand_as(inputs["y"]).to(inputs["y"].dtype)
    return setup.sampler(config).sample(
        model,
        inputs["z"],
        inputs["y"],
        y_null,
        inputs["mask"],
        model_kwargs=inputs["model_kwargs"],
        progress=False,
        seed=0,
    )


def time_method(
    model: STDiT3, setup: BenchSetup, method: str, inputs: dict[str, Any], offload: bool = False
) -> dict[str, Any]:
    """One timed loop: per-step times by kind, peak memory, cache bytes (with `offload`: the cache in pinned host
    memory, each block's share prefetched on a side stream while the block before it runs)."""
    device = inputs["z"].device
    controller = cache_lib.enable(model, method, offload=offload)
    clock = StepClock(device)
    register_listener(model, clock)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.no_grad():
            latent = sample(model, setup, method, inputs)
        per_step = clock.step_ms()
        total = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    finally:
        unregister_listener(model, clock)
        cache_lib.disable(model)
    kinds = [h["kind"] for h in controller.history] or ["full"] * len(per_step)
    by_kind: dict[str, list[float]] = {}
    for kind, ms in zip(kinds, per_step):
        by_kind.setdefault(kind, []).append(ms)
    store = controller.last.store if controller.last is not None else None
    return {
        "total_s": total,
        "step_ms": {k: statistics.mean(v) for k, v in by_kind.items()},
        "step_counts": {k: len(v) for k, v in by_kind.items()},
        "steps_ms": per_step,
        "kinds": kinds,
        "peak_memory_bytes": peak,
        "cache_bytes": controller.cache_bytes,
        "device_cache_bytes": controller.device_cache_bytes,
        "offload": offload,
        "offload_reads": getattr(store, "reads", None),
        "latent": latent.float().cpu(),
    }


def offload_check(
    model: STDiT3, setup: BenchSetup, inputs: dict[str, Any], resident: dict[str, Any], method: str
) -> dict[str, Any]:
    """The method again with its cache offloaded: time per step kind, peak memory, and the same latent."""
    r = time_method(model, setup, method, inputs, offload=True)
    r["max_abs_diff_to_resident"] = float((r.pop("latent") - resident["latent"]).abs().max())
    return r


def compile_check(
    model: STDiT3,
    setup: BenchSetup,
    inputs: dict[str, Any],
    eager: dict[str, dict[str, Any]],
    methods: list[str],
    backend: str = "inductor",
) -> dict[str, Any]:
    """`cache.compile_blocks`: the first loop (compiling), then a timed one per method, and the difference to the
    eager latent. Leaves the model's blocks compiled."""
    start = time.perf_counter()
    cache_lib.compile_blocks(model, backend=backend)
    out: dict[str, Any] = {"compiled": f"cache.compile_blocks (attn, cross_attn, mlp; {backend}, dynamic=False)"}
    for method in methods:
        first = time.perf_counter()
        time_method(model, setup, method, inputs)  # compiles this method's shapes
        r = time_method(model, setup, method, inputs)
        r["first_loop_s"] = time.perf_counter() - first - r["total_s"]
        r["max_abs_diff_to_eager"] = float((r.pop("latent") - eager[method]["latent"]).abs().max())
        out[method] = r
    out["total_s"] = time.perf_counter() - start
    return out


def sdpa_ops(model: STDiT3, setup: BenchSetup, inputs: dict[str, Any]) -> dict[str, Any]:
    """The SDPA kernels one uncached CFG forward really runs, by site (told apart by the key length)."""
    from torch.profiler import ProfilerActivity, profile

    t, h, w = setup.latent_shape
    _, ph, pw = setup.model.patch_size
    spatial = -(-h // ph) * -(-w // pw)
    z = torch.cat([inputs["z"], inputs["z"]])
    y = torch.cat([inputs["y"], inputs["y"]])
    kw = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in inputs["model_kwargs"].items()}
    kw.pop("num_frames", None)
    timestep = torch.full((2,), 900.0, device=z.device)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(z, timestep, y, mask=torch.cat([inputs["mask"], inputs["mask"]]), **kw)
    found: Counter = Counter()
    for e in prof.events():
        if "scaled_dot_product" in e.name and "attention" in e.name and e.name != "aten::scaled_dot_product_attention":
            keys = e.input_shapes[1][2] if e.input_shapes and len(e.input_shapes[1]) == 4 else None
            site = {spatial: "spatial self", t: "temporal self"}.get(keys, "cross")
            found[f"{site}: {e.name}"] += 1
    return dict(found)


def sync_check(model: STDiT3, setup: BenchSetup, inputs: dict[str, Any], method: str = "duca") -> dict[str, Any]:
    """`set_sync_debug_mode("error")` around a cached loop: from step 0, from step 1 (after sample start), and
    from step 1 with the cache offloaded (pinned host memory, side-stream copies)."""
    if inputs["z"].device.type != "cuda":
        return {"skipped": "CUDA absent: torch.cuda.set_sync_debug_mode only checks CUDA streams"}
    out = {}
    for first, offload in ((0, False), (1, False), (1, True)):
        key = f"{'offloaded_' if offload else ''}from_step_{first}"
        arm = _SyncArm(first)
        cache_lib.enable(model, method, offload=offload)
        register_listener(model, arm)
        try:
            with torch.no_grad():
                sample(model, setup, method, inputs)
            torch.cuda.set_sync_debug_mode(0)
            out[key] = {"passed": True}
        except RuntimeError as exc:
            torch.cuda.set_sync_debug_mode(0)
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if "duca_video" in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].name}" if frames else "outside duca_video"
            out[key] = {
                "passed": False,
                "error": str(exc).splitlines()[0],
                "where": where,
                "line": frames[-1].line if frames else None,
            }
        finally:
            torch.cuda.set_sync_debug_mode(0)
            unregister_listener(model, arm)
            cache_lib.disable(model)
    return {"method": method, **out}


class _SyncArm:
    """Turns the sync debug mode on when step `first` starts, off when the sample ends."""

    def __init__(self, first: int) -> None:
        self.first = first

    def on_sample_start(self, event) -> None: ...

    def on_step_start(self, event) -> None:
        if event.index == self.first:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    def on_sample_end(self) -> None:
        torch.cuda.set_sync_debug_mode(0)


def precision_check(model: STDiT3, setup: BenchSetup, device: torch.device) -> dict[str, Any]:
    """bf16 against fp32 on a small forward with the same (bf16-representable) weights; converts the model."""
    g = torch.Generator().manual_seed(1)
    cfg = setup.model
    latent = (2, 8, 8) if cfg.depth < 28 else (2, 16, 16)
    x = torch.randn(2, cfg.in_channels, *latent, generator=g).to(device)
    y = torch.randn(2, 1, cfg.model_max_length, cfg.caption_channels, generator=g).to(device)
    kw = dict(
        height=torch.full((2,), 8.0 * latent[1]),
        width=torch.full((2,), 8.0 * latent[2]),
        fps=torch.full((2,), 24.0, device=device),
    )
    t = torch.tensor([900.0, 300.0], device=device)
    with torch.no_grad():
        low = model.to(torch.bfloat16)(x.bfloat16(), t, y.bfloat16(), **kw).float()
        high = model.float()(x, t, y, **kw)
    diff = (low - high).abs()
    return {
        "latent": list(latent),
        "max_abs_diff": float(diff.max()),
        "mean_abs_fp32": float(high.abs().mean()),
        "rel_l2": float((low - high).norm() / high.norm()),
    }


def report(name: str, r: dict[str, Any]) -> None:
    peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f} GiB"
    kinds = "  ".join(f"{k} {v:.1f} ms x{r['step_counts'][k]}" for k, v in r["step_ms"].items())
    extra = "".join(f"  {k} {r[k]:.2g}" for k in ("max_abs_diff_to_resident", "max_abs_diff_to_eager") if k in r)
    print(
        f"{name:<11} {r['total_s']:7.2f} s  {kinds}  peak {peak}  cache {r['cache_bytes'] / 2**20:.1f} MiB "
        f"(device {r['device_cache_bytes'] / 2**20:.1f} MiB){extra}"
    )


def write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def probe_table(setup: BenchSetup, device: torch.device, dtype: torch.dtype, text_tokens: int) -> Any:
    try:
        from duca_video.models import sdpa_probe
    except ImportError as exc:
        return {"skipped": f"duca_video.models.sdpa_probe not importable: {exc}"}
    t, h, w = setup.latent_shape
    g = sdpa_probe.Geometry(t, -(-h // 2), -(-w // 2))
    cfg = setup.model
    sites = sdpa_probe.attention_sites(
        g,
        heads=cfg.num_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        text_tokens=min(text_tokens, cfg.model_max_length),
        max_text=cfg.model_max_length,
    )
    return sdpa_probe.probe(sites, device, dtype, trial_batch=None if device.type == "cuda" else 1)


def build_parser() -> ToolParser:
    p = ToolParser(
        prog="scripts/gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (or CUDA if present), seconds")
    p.add_argument("--out", default="gpu_check.json", help="the JSON summary (its folder must exist)")
    p.add_argument("--methods", type=name_list(METHODS), default=list(METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument("--steps", type=positive_int, help="sampling steps (default 30; tiny 10)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument(
        "--text-tokens",
        type=positive_int,
        help="valid caption tokens of the random prompt (default 60, "
        f"at most {STDiT3Config().model_max_length}; tiny: 4, at most {TINY.model_max_length})",
    )
    p.add_argument(
        "--offload",
        type=name_list(METHODS, empty_ok=True),
        default=["duca"],
        help="methods to time again with the cache offloaded ('' for none)",
    )
    p.add_argument(
        "--compile",
        type=name_list(METHODS, empty_ok=True),
        default=[],
        help="methods to time again with compiled blocks, e.g. none,duca",
    )
    p.add_argument("--compile-backend", type=nonempty, default="inductor", help="torch.compile backend for --compile")
    return p


def check_args(args: argparse.Namespace) -> None:
    """What the flags name, checked before any work (ArgError naming the flag and what is allowed)."""
    for flag, names in (("--offload", args.offload), ("--compile", args.compile)):
        missing = [m for m in names if m not in args.methods]
        if missing:
            raise ArgError(f"{flag}: {missing} must be in --methods too (the eager reference)")
    limit = (TINY if args.tiny else STDiT3Config()).model_max_length
    if args.text_tokens is not None and args.text_tokens > limit:
        raise ArgError(
            f"--text-tokens {args.text_tokens} is not allowed; allowed: 1..{limit} (the "
            f"{'tiny ' if args.tiny else ''}model's caption length)"
        )
    output_file(args.out, "--out")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.check(check_args, args)
    if not torch.cuda.is_available() and not args.tiny:
        print("error: gpu_check needs CUDA (none found); run with --tiny for the CPU self-test", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    setup = build_setup(args.tiny, args.steps, args.text_tokens)
    out = Path(args.out)
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "timer": "cuda events" if device.type == "cuda" else "perf_counter",
        "setup": {**setup.to_dict(), "model": setup.model.to_dict()},
        "methods": {},
    }
    torch.manual_seed(0)
    with torch.device(device):
        model = STDiT3(setup.model).eval()
    model = model.to(dtype)
    inputs = make_inputs(setup, device, dtype)
    time_method(model, BenchSetup(**{**setup.__dict__, "num_steps": 2}), "none", inputs)  # warm-up
    timed = run_parts(model, setup, inputs, args, summary, out)
    if args.compile:
        summary["compiled"] = compile_check(model, setup, inputs, timed, args.compile, args.compile_backend)
        for method in args.compile:
            report(f"{method} compiled", summary["compiled"][method])
        write(out, summary)
    summary["bf16_vs_fp32"] = precision_check(model, setup, device)
    print("bf16 vs fp32:", summary["bf16_vs_fp32"])
    write(out, summary)
    print(f"wrote {out}")
    return 0


def run_parts(
    model: STDiT3,
    setup: BenchSetup,
    inputs: dict[str, Any],
    args: argparse.Namespace,
    summary: dict[str, Any],
    out: Path,
) -> dict[str, dict[str, Any]]:
    """The timed methods, their offloaded runs, the SDPA kernels and the sync check; the JSON after each."""
    timed: dict[str, dict[str, Any]] = {}
    for method in args.methods:
        timed[method] = r = time_method(model, setup, method, inputs)
        summary["methods"][method] = {k: v for k, v in r.items() if k != "latent"}
        report(method, r)
        write(out, summary)
    summary["offloaded"] = {}
    for method in args.offload:
        summary["offloaded"][method] = r = offload_check(model, setup, inputs, timed[method], method)
        report(f"{method} offloaded", r)
        write(out, summary)
    summary["sdpa_ops"] = sdpa_ops(model, setup, inputs)
    summary["sdpa_probe"] = probe_table(
        setup, device=inputs["z"].device, dtype=next(model.parameters()).dtype, text_tokens=setup.text_tokens
    )
    print("sdpa kernels run by one forward:", summary["sdpa_ops"])
    write(out, summary)
    summary["sync_check"] = sync_check(model, setup, inputs)
    print("sync check:", summary["sync_check"])
    write(out, summary)
    return timed


if __name__ == "__main__":
    sys.exit(main())
