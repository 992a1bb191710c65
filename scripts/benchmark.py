"""Compare caching methods side by side on one config: FLOPs, latency, peak and cache memory, fidelity.

    python scripts/benchmark.py --config configs/duca_480p.py --methods none,duca,toca --json out.json --flops-only
    python scripts/benchmark.py --config configs/bench_cpu.py --methods none,duca,toca,fora --json cpu.json

`--flops-only` counts the whole sampling loop on the meta device (no weights, runs at Open-Sora sizes on a
laptop). Otherwise every method also generates the same sample on the chosen device (random weights unless
`--ckpt-path` is given): latency (median of `--repeats`), peak CUDA memory, cache bytes, and PSNR/SSIM of its
final latent against `none`'s. Writes the per-method JSON of docs/benchmarks.md (to a temp file, then renamed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from duca_video.cache import METHODS
from duca_video.cache.variants import parse_variant, split_variants
from duca_video.cli_checks import ArgError, ToolParser, int_list, nonempty, output_file, positive_int
from duca_video.conditioning import parse_mask_strategy
from duca_video.configs import ConfigError
from duca_video.configs.loader import load_config
from duca_video.configs.preflight import InputError, resolve_device
from duca_video.metrics.benchmark import BenchSetup, compare, format_table
from duca_video.metrics.flops import video_latent_shape
from duca_video.metrics.pareto import format_margins, front_margins
from duca_video.metrics.plot import speedup_fidelity_plot
from duca_video.models import STDiT3, STDiT3Config

DEFAULT_PROMPTS = 64  # testbed configs: prompt/seed pairs per method
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROG = "scripts/benchmark.py"


def build_parser() -> ToolParser:
    p = ToolParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="an inference config file (configs/*.py)")
    p.add_argument(
        "--methods",
        type=nonempty,
        default=",".join(METHODS),
        help=f"comma-separated variants: a method "
        f"from {', '.join(METHODS)}, optionally with settings, e.g. teacache[threshold=0.2],"
        "taylorseer[interval=3;order=2]",
    )
    p.add_argument("--json", required=True, help="where to write the results (missing folders are created)")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs only (meta device, no weights)")
    p.add_argument("--device", type=nonempty, help="auto (default), cpu, cuda, cuda:N (Open-Sora configs)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: the config's; Open-Sora configs)")
    p.add_argument("--repeats", type=positive_int, default=1, help="timed runs per method (median latency)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-sampling-steps", type=positive_int, help="override the config's steps")
    p.add_argument("--ckpt-path", type=nonempty, help="STDiT3 weights for the timed runs (default: random weights)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument("--prompts", type=positive_int, help="testbed configs: fixed prompt/seed pairs per method (64)")
    p.add_argument(
        "--mask-strategy",
        type=nonempty,
        help="testbed configs: also measure each method's fidelity "
        "to `none` with this Open-Sora mask strategy on a reference frame (e.g. 0: image to "
        "video)",
    )
    p.add_argument("--plot", help="also write a PNG of speed-up against PSNR / SSIM vs none")
    p.add_argument(
        "--sp-sizes",
        type=int_list(2),
        help="e.g. 2,4,8: also count the bytes each method sends per "
        "video under sequence parallelism of these sizes (meta device, simulated group)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _check_methods(text: str) -> list[str]:
    methods = split_variants(text)
    if not methods:
        raise ArgError(
            f"--methods {text!r}: no variant given; allowed: comma-separated variants from {', '.join(METHODS)}"
        )
    for variant in methods:
        try:
            parse_variant(variant)
        except (ValueError, TypeError) as exc:
            raise ArgError(f"--methods: {exc}") from None
    return methods


def _check_testbed(args: argparse.Namespace, cfg) -> None:
    given = [
        flag
        for flag, value in (
            ("--flops-only", args.flops_only or None),
            ("--sp-sizes", args.sp_sizes),
            ("--device", args.device),
            ("--dtype", args.dtype),
        )
        if value is not None
    ]
    if given:
        raise ArgError(
            f"{', '.join(given)}: not allowed with the testbed config {args.config!r} (it always runs "
            "the trained model on the CPU in its own dtype); allowed with Open-Sora configs"
        )
    weights = args.ckpt_path or cfg.model.from_pretrained
    if weights is None or not Path(weights, "config.json").is_file():
        flag = "--ckpt-path" if args.ckpt_path else "model.from_pretrained"
        raise ArgError(
            f"{flag} {weights!r}: the testbed benchmark needs trained weights; allowed: a folder with "
            "config.json (e.g. weights/tiny)"
        )
    if args.mask_strategy is not None:
        try:
            parse_mask_strategy(args.mask_strategy, "--mask-strategy")
        except ValueError as exc:
            raise ArgError(str(exc)) from None


def _check_open_sora(args: argparse.Namespace, cfg) -> None:
    given = [
        flag
        for flag, value in (("--prompts", args.prompts), ("--mask-strategy", args.mask_strategy))
        if value is not None
    ]
    if given:
        raise ArgError(
            f"{', '.join(given)}: only for the testbed config (text_encoder type 'word'); "
            f"{args.config!r} is an Open-Sora config"
        )
    if args.ckpt_path is not None and not Path(args.ckpt_path).expanduser().exists():
        raise ArgError(f"--ckpt-path {args.ckpt_path!r} does not exist; allowed: an STDiT3 checkpoint file or folder")
    if not args.flops_only:
        try:
            resolve_device(args.device or "auto")
        except InputError as exc:
            raise ArgError(f"--device: {exc}") from None
    heads = STDiT3Config.from_dict(cfg.model.extra).num_heads
    bad = [p for p in args.sp_sizes or () if heads % p]
    if bad:
        raise ArgError(
            f"--sp-sizes {bad}: the SP size must divide the model's {heads} heads; allowed: "
            f"{[p for p in range(2, heads + 1) if heads % p == 0]}"
        )


def check_args(args: argparse.Namespace):
    """Everything the flags name, checked before any work (ArgError naming the flag); returns the config."""
    args.methods = _check_methods(args.methods)
    output_file(args.json, "--json", create_folders=True)
    output_file(args.plot, "--plot")
    try:
        cfg = load_config(args.config)
        STDiT3Config.from_dict(cfg.model.extra)
    except (ConfigError, ValueError, TypeError) as exc:
        raise ArgError(f"--config: {exc}") from None
    if cfg.text_encoder.type == "word":
        _check_testbed(args, cfg)
    else:
        _check_open_sora(args, cfg)
    return cfg


def setup_from_config(path: str, steps: int | None) -> BenchSetup:
    cfg = load_config(path)
    model_cfg = STDiT3Config.from_dict(cfg.model.extra)
    h, w = cfg.size
    if cfg.vae.type == "OpenSoraVAE_V1_2":
        latent = video_latent_shape(cfg.num_frames, h, w)
    else:  # pixel-space testbed: the latent is the video
        latent = (cfg.num_frames, h, w)
    overrides = {cfg.cache.method: cfg.cache.overrides} if cfg.cache.overrides else {}
    num_steps = cfg.scheduler.num_sampling_steps if steps is None else steps
    return BenchSetup(
        model=model_cfg,
        latent_shape=latent,
        image_size=(h, w),
        num_frames=cfg.num_frames,
        num_steps=num_steps,
        cfg_scale=cfg.scheduler.cfg_scale,
        batch=cfg.batch_size,
        fps=float(cfg.fps),
        cache_overrides=overrides,
        use_timestep_transform=cfg.scheduler.use_timestep_transform,
    )


def write_json(path: str, data: dict) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=True)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = parser.check(check_args, args)
    methods = args.methods
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if cfg.text_encoder.type == "word":  # the trained testbed model: real prompts, adherence from the frames
        results, run = testbed(cfg, args, methods)
    else:
        results, run = open_sora(cfg, args, methods)
    print(format_table(results))
    if any(m.partition("[")[0] == "auto" for m in results) and all(r.get("psnr_vs_none") for r in results.values()):
        print("\n`auto` against the fixed variants at equal or lower FLOPs:")
        print(format_margins(front_margins(results, "auto")))
    write_json(args.json, {"config": run, "methods": results})
    if args.plot:
        points = [
            {"method": m, "speedup": r["flops_speedup"], "psnr": r["psnr_vs_none"], "ssim": r["ssim_vs_none"]}
            for m, r in results.items()
        ]
        why = speedup_fidelity_plot(
            points,
            Path(args.plot),
            "DiT FLOPs speed-up vs none (x)",
            [("psnr", "PSNR vs none (dB)"), ("ssim", "SSIM vs none")],
        )
        if why:
            print(f"no plot: {why}", file=sys.stderr)
    return 0


def testbed(cfg, args: argparse.Namespace, methods: list[str]) -> tuple[dict, dict]:
    from duca_video.metrics.testbed_bench import compare_testbed
    from duca_video.testbed.tiny import load_tiny

    weights = args.ckpt_path or cfg.model.from_pretrained  # checked in check_args
    prompts = DEFAULT_PROMPTS if args.prompts is None else args.prompts
    bed = load_tiny(weights)
    if args.num_sampling_steps is not None:
        bed.sampler.num_sampling_steps = args.num_sampling_steps
    results = compare_testbed(bed, methods, n_prompts=prompts, seed=args.seed, repeats=args.repeats)
    if args.mask_strategy:  # the same methods with reference frames kept (Open-Sora's image / video conditioning)
        from duca_video.metrics.conditioning_bench import conditioning_fidelity

        conditioned = conditioning_fidelity(
            methods,
            num_videos=min(prompts, 8),
            seed=args.seed,
            num_steps=bed.sampler.num_sampling_steps,
            mask_strategy=args.mask_strategy,
        )
        for name, r in conditioned["methods"].items():
            results[name].update(
                cond_psnr_vs_none=r["psnr_vs_none"], cond_ssim_vs_none=r["ssim_vs_none"], cond_kept_psnr=r["kept_psnr"]
            )
    run = {
        "config_file": args.config,
        "weights": str(weights),
        "prompts": prompts,
        "seed": args.seed,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "sampler": dataclasses.asdict(bed.sampler),
        "model": bed.model.config.to_dict(),
        "mask_strategy": args.mask_strategy,
    }
    return results, run


def open_sora(cfg, args: argparse.Namespace, methods: list[str]) -> tuple[dict, dict]:
    setup = setup_from_config(args.config, args.num_sampling_steps)
    device = args.device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype or cfg.dtype]
    model = None
    if args.ckpt_path and not args.flops_only:
        model = STDiT3.from_pretrained(args.ckpt_path, config=setup.model, dtype=dtype, device=device)
    sp_sizes = tuple(args.sp_sizes or ())
    results = compare(
        setup,
        methods,
        model=model,
        flops_only=args.flops_only,
        device=device,
        dtype=dtype,
        repeats=args.repeats,
        seed=args.seed,
        sp_sizes=sp_sizes,
    )
    run = {
        "config_file": args.config,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "weights": args.ckpt_path or "random",
        "threads": torch.get_num_threads(),
        "flops_only": args.flops_only,
        "repeats": args.repeats,
        "seed": args.seed,
    }
    return results, {**setup.to_dict(), **run}


if __name__ == "__main__":
    sys.exit(main())
