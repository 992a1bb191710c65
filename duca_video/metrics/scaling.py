"""A scaling model: time per video on p GPUs for sequence parallelism (SP), CFG parallelism and data parallelism.

    python -m duca_video.metrics.scaling                          # stated H100/H200 bf16 effective FLOP rate
    python -m duca_video.metrics.scaling --kernel-times gpu.json  # rate measured by scripts/gpu_check.py
    python -m duca_video.metrics.scaling --methods none,duca --nvlink-gbps 300 --ib-gbps 40

The model, per sampling step (no overlap of compute and communication: our collectives are blocking):
  compute(p) = FLOPs one rank does in that step / effective FLOP rate. FLOPs per rank are counted on the meta
               device through our SP code over a simulated group, so the replicated work (text projection,
               timestep embedder) and the padding of S up to a multiple of p are in the count.
  comm(p)    = bytes one rank sends in that step / link bandwidth + per-collective latency. The bytes are our
               Ulysses all-to-alls (q, k, v and the output of every spatial self-attention); steps that reuse
               the cached attention send nothing (read off the real cached loop on meta).
  SP:        one video on p ranks (p must divide the 16 heads).
  CFG + SP:  the cond and null halves on two groups of p/2 ranks, one exchange of the prediction per step.
  DP:        p videos on p ranks, nothing sent: time per video = 1-GPU time / p (needs p videos).
Placements: "NVLink" = all p ranks in one node; "InfiniBand" = ranks spread over nodes with
`--ib-gpus-per-node` GPUs each, off-node traffic over IB (in parallel with the on-node part).
Only the DiT sampling loop is modelled (no T5, no VAE decode): published end-to-end times include both.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from duca_video.cli_checks import (
    ArgError,
    ToolParser,
    name_list,
    nonempty,
    output_file,
    positive_float,
    positive_int,
    refuse,
)
from duca_video.io.files import atomic_write_json

from .. import cache as cache_lib
from ..models.stdit3 import STDiT3Config
from .benchmark import BenchSetup
from .flops import video_latent_shape
from .steps import StepCost, forward_cost, loop_steps, ulysses_bytes_per_forward

# Stated, not measured: H100/H200 SXM dense bf16 peak is ~989 TFLOP/s; 40% of it is a typical transformer
# inference MFU for large matmul-bound models. Replace it with a measured rate (--kernel-times) when possible.
DEFAULT_TFLOPS = 400.0
# NVLink 4 (H100/H200 SXM): 450 GB/s per GPU per direction nominal; ~70% reached by NCCL all-to-all.
DEFAULT_NVLINK_GBPS = 300.0
# One 400 Gb/s NDR InfiniBand HCA per GPU = 50 GB/s nominal; ~80% reached.
DEFAULT_IB_GBPS = 40.0
RESOLUTIONS = {"480p": (480, 854), "720p": (720, 1280)}
# The methods whose loop is counted on meta (not those that decide their steps from the data).
COUNTED_METHODS = tuple(m for m in cache_lib.METHODS if not cache_lib.make_config(m).data_dependent)
PUBLISHED_720P_16S = {1: 547.0, 2: 244.0}  # Open-Sora 1.2 README, H100, seconds per video (end to end)


@dataclass
class Links:
    nvlink_gbps: float = DEFAULT_NVLINK_GBPS
    ib_gbps: float = DEFAULT_IB_GBPS
    nvlink_latency_us: float = 10.0
    ib_latency_us: float = 20.0
    ib_gpus_per_node: int = 1

    def transfer_s(self, bytes_sent: float, p: int, placement: str, collectives: int) -> float:
        """Time for one rank to send `bytes_sent` spread evenly over its p - 1 peers, in `collectives` calls."""
        if p <= 1 or bytes_sent <= 0:
            return 0.0
        if placement == "nvlink":
            return bytes_sent / (self.nvlink_gbps * 1e9) + collectives * self.nvlink_latency_us * 1e-6
        local_peers = min(self.ib_gpus_per_node, p) - 1
        off_node = bytes_sent * (p - 1 - local_peers) / (p - 1)
        on_node = bytes_sent - off_node
        wire = max(on_node / (self.nvlink_gbps * 1e9), off_node / (self.ib_gbps * 1e9))
        return wire + collectives * self.ib_latency_us * 1e-6


@dataclass
class SizeProfile:
    """What the model needs about one (resolution, frames, method): per-step costs on 1 rank and per-p shares."""

    name: str
    config: STDiT3Config
    latent_shape: tuple[int, int, int]
    steps: list[StepCost]  # 1 rank, CFG batch of 2 rows
    comm_steps: list[bool]  # does this step run the spatial attention all-to-alls (counted at SP 2)
    share: dict[int, float]  # per-rank FLOPs of a forward at SP p / FLOPs at p = 1
    half_share: dict[int, float]  # the same for one CFG half (1 row) on p ranks, relative to 2 rows on 1 rank

    @property
    def total_flops(self) -> int:
        return sum(s.flops for s in self.steps)


def profile(
    name: str,
    method: str,
    image_size: tuple[int, int],
    num_frames: int,
    steps: int = 30,
    config: STDiT3Config | None = None,
    sp_sizes: tuple[int, ...] = (1, 2, 4, 8),
    halves: bool = True,
) -> SizeProfile:
    """Count one method's loop at one size on meta (1 rank, and SP 2 for which steps communicate); `halves`
    also counts one CFG half per SP size (for CFG parallelism)."""
    config = config or STDiT3Config()
    latent = video_latent_shape(num_frames, *image_size)
    base = forward_cost(config, latent, image_size, rows=2)[0]
    if method == "none":  # every step is one full forward of the CFG batch: count one forward, not 30
        costs, comm = [StepCost("full", base, 0) for _ in range(steps)], [True] * steps
    else:
        setup = BenchSetup(
            model=config, latent_shape=latent, image_size=image_size, num_frames=num_frames, num_steps=steps
        )
        costs = loop_steps(setup, method)
        comm = [s.bytes_sent > 0 for s in loop_steps(setup, method, sp_size=2)]
    valid = [p for p in sp_sizes if config.num_heads % p == 0]
    share = {p: 1.0 if p == 1 else forward_cost(config, latent, image_size, 2, p)[0] / base for p in valid}
    half = {p: forward_cost(config, latent, image_size, 1, p)[0] / base for p in valid} if halves else {}
    return SizeProfile(name, config, latent, costs, comm, share, half)


def predict(
    prof: SizeProfile, tflops: float, links: Links, p: int, strategy: str, placement: str, dtype_bytes: int = 2
) -> dict[str, Any] | None:
    """Seconds per video and its parts for one strategy on p GPUs; None where the strategy cannot use p."""
    rate = tflops * 1e12
    one_gpu = prof.total_flops / rate
    if strategy == "dp":
        return {"time_s": one_gpu / p, "compute_s": one_gpu / p, "comm_s": 0.0, "bytes_per_comm_step": 0}
    cfg = 2 if strategy == "cfg+sp" else 1
    if p % cfg:
        return None
    sp = p // cfg
    shares = prof.half_share if cfg == 2 else prof.share
    if sp not in shares:
        return None
    rows = 2 // cfg
    step_bytes = ulysses_bytes_per_forward(prof.config, prof.latent_shape, rows, sp, dtype_bytes)
    compute = sum(s.flops for s in prof.steps) * shares[sp] / rate
    n_comm = sum(prof.comm_steps)
    comm = n_comm * links.transfer_s(step_bytes, sp, placement, 2 * prof.config.depth)
    if cfg == 2:  # each half's prediction (my spatial shard of it) goes to the other half once per step
        t, h, w = prof.latent_shape
        pred = prof.config.in_channels * t * h * w * dtype_bytes // sp
        comm += len(prof.steps) * links.transfer_s(pred, 2, placement, 1)
    return {"time_s": compute + comm, "compute_s": compute, "comm_s": comm, "bytes_per_comm_step": step_bytes}


def table(prof: SizeProfile, tflops: float, links: Links, placement: str, max_p: int = 8) -> str:
    """Markdown: seconds per video for p = 1..max_p under each strategy."""
    title = "NVLink, one node" if placement == "nvlink" else f"InfiniBand, {links.ib_gpus_per_node} GPU(s) per node"
    lines = [
        f"{prof.name}, {title}: seconds per video (compute + comm); SP bytes sent per rank per full step",
        "",
        "| GPUs | SP | CFG + SP | DP (p videos) | SP MB/rank/step | SP comm share |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in range(1, max_p + 1):
        cells = []
        for strategy in ("sp", "cfg+sp", "dp"):
            r = predict(prof, tflops, links, p, strategy, placement)
            cells.append("-" if r is None else f"{r['time_s']:.1f}")
        sp = predict(prof, tflops, links, p, "sp", placement)
        mb = "-" if sp is None else f"{sp['bytes_per_comm_step'] / 1e6:.0f}"
        share = "-" if sp is None else f"{100 * sp['comm_s'] / sp['time_s']:.0f}%"
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {mb} | {share} |")
    return "\n".join(lines)


def published_comparison(prof: SizeProfile, tflops: float, links: Links) -> tuple[str, dict[str, float]]:
    """Our 1- and 2-GPU (SP 2, NVLink) predictions for 720p 16 s against Open-Sora's published 547 s / 244 s."""
    one = predict(prof, tflops, links, 1, "sp", "nvlink")["time_s"]
    two = predict(prof, tflops, links, 2, "sp", "nvlink")["time_s"]
    pub1, pub2 = PUBLISHED_720P_16S[1], PUBLISHED_720P_16S[2]
    implied = prof.total_flops / pub1 / 1e12
    figures = {
        "predicted_1gpu_s": one,
        "predicted_2gpu_s": two,
        "published_1gpu_s": pub1,
        "published_2gpu_s": pub2,
        "ratio_1gpu": one / pub1,
        "ratio_2gpu": two / pub2,
        "predicted_speedup": one / two,
        "published_speedup": pub1 / pub2,
        "implied_tflops_from_1gpu": implied,
    }
    text = "\n".join(
        [
            f"Open-Sora 1.2, 720p 16 s (408 frames, latent {prof.latent_shape}), 30 steps CFG, uncached:",
            f"  1 GPU : predicted {one:7.1f} s  published {pub1:.0f} s  (predicted / published = {one / pub1:.2f})",
            f"  2 GPUs: predicted {two:7.1f} s  published {pub2:.0f} s  (predicted / published = {two / pub2:.2f})",
            f"  speed-up 1 -> 2 GPUs: predicted {one / two:.2f}x, published {pub1 / pub2:.2f}x",
            f"  the DiT loop is {prof.total_flops / 1e15:.1f} PFLOPs; the published 1-GPU time implies an effective "
            f"{implied:.0f} TFLOP/s (end to end, T5 and VAE included) against the {tflops:.0f} assumed here",
        ]
    )
    return text, figures


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _sizes(value: Any, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(isinstance(v, int) and _number(v) for v in value)


def read_kernel_times(path: str) -> tuple[STDiT3Config, tuple[int, ...], tuple[int, ...], float, bool]:
    """(model config, latent shape, image size, mean full-step ms of `none`, measured on a CPU) from a
    scripts/gpu_check.py JSON; ArgError naming the field when the file is not one (missing or of another type)."""
    where = f"--kernel-times {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArgError(f"{where}: {exc}") from None
    hint = "run scripts/gpu_check.py"
    if not isinstance(data, dict):
        raise ArgError(f"{where}: not a gpu_check JSON (a {type(data).__name__}, not an object); {hint}")
    try:
        setup, ms = data["setup"], data["methods"]["none"]["step_ms"]["full"]
        model, latent, image = setup["model"], setup["latent_shape"], setup["image_size"]
    except KeyError as exc:
        raise ArgError(f"{where}: not a gpu_check JSON (missing {exc}); {hint}") from None
    except TypeError:  # a list or a number where an object belongs
        raise ArgError(
            f"{where}: not a gpu_check JSON (setup, methods, methods.none or its step_ms is not an object); {hint}"
        ) from None
    for field, ok, allowed in (
        ("methods.none.step_ms.full", _number(ms), "a number of milliseconds > 0"),
        ("setup.model", isinstance(model, dict), "an object of STDiT3 settings"),
        ("setup.latent_shape", _sizes(latent, 3), "3 integers > 0"),
        ("setup.image_size", _sizes(image, 2), "2 integers > 0"),
    ):
        if not ok:
            raise ArgError(
                f"{where}: not a gpu_check JSON ({field} is {_show(data, field)}; allowed: {allowed}); {hint}"
            )
    try:
        config = STDiT3Config.from_dict(model)
    except (TypeError, ValueError) as exc:
        raise ArgError(f"{where}: setup.model: {exc}") from None
    return config, tuple(latent), tuple(image), float(ms), data.get("device") == "cpu"


def _show(data: dict[str, Any], field: str) -> str:
    value: Any = data
    for key in field.split("."):
        value = value[key]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def rate_from_kernel_times(path: str) -> float:
    """Effective TFLOP/s from a scripts/gpu_check.py JSON: the counted FLOPs of a full CFG step of its setup
    divided by the measured mean time of the uncached method's full steps."""
    try:
        config, latent, image, ms, on_cpu = read_kernel_times(path)
    except ArgError as exc:
        refuse(str(exc))
    if on_cpu:
        print(f"note: {path} was measured on a CPU (gpu_check --tiny): its rate says nothing about a GPU")
    flops, _ = forward_cost(config, latent, image, rows=2, dtype=torch.float32)
    return flops / (ms / 1e3) / 1e12


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ToolParser(
        prog="python -m duca_video.metrics.scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kernel-times", type=nonempty, help="a scripts/gpu_check.py JSON: use its measured full-step rate")
    p.add_argument("--tflops", type=positive_float, default=DEFAULT_TFLOPS, help="effective bf16 TFLOP/s per GPU")
    p.add_argument("--nvlink-gbps", type=positive_float, default=DEFAULT_NVLINK_GBPS, help="GB/s one GPU sends, NVLink")
    p.add_argument("--ib-gbps", type=positive_float, default=DEFAULT_IB_GBPS, help="GB/s one GPU sends, InfiniBand")
    p.add_argument("--ib-gpus-per-node", type=positive_int, default=1, help="GPUs per node in the InfiniBand placement")
    p.add_argument(
        "--methods",
        type=name_list(COUNTED_METHODS),
        default=["none"],
        help=f"comma-separated cache methods from {', '.join(COUNTED_METHODS)} (not the ones that "
        "decide their steps from the data)",
    )
    p.add_argument(
        "--resolutions",
        type=name_list(tuple(RESOLUTIONS)),
        default=["480p", "720p"],
        help=f"from {', '.join(RESOLUTIONS)}",
    )
    p.add_argument("--num-frames", type=positive_int, default=51, help="frames of the tables' videos (51 = 2 s)")
    p.add_argument("--steps", type=positive_int, default=30)
    p.add_argument("--no-published", action="store_true", help="skip the 720p 16 s comparison")
    p.add_argument("--published-only", action="store_true", help="only the 720p 16 s comparison, no tables")
    p.add_argument("--json", help="also write every prediction here (its folder must exist)")
    args = p.parse_args(argv)
    if args.published_only and args.no_published:
        p.error("--published-only and --no-published together leave nothing to compute; allowed: one of them")
    if 1 < args.num_frames < 17 and args.methods != ["none"] and not args.published_only:
        p.error(
            f"argument --num-frames: {args.num_frames} is not allowed with cached methods (their loop follows "
            "the timestep transform); allowed: 1 or >= 17"
        )
    p.check(output_file, args.json, "--json")
    if args.kernel_times:
        p.check(read_kernel_times, args.kernel_times)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    links = Links(args.nvlink_gbps, args.ib_gbps, ib_gpus_per_node=args.ib_gpus_per_node)
    tflops = rate_from_kernel_times(args.kernel_times) if args.kernel_times else args.tflops
    source = f"measured ({args.kernel_times})" if args.kernel_times else "stated default"
    print(
        f"effective rate {tflops:.0f} TFLOP/s per GPU ({source}); NVLink {links.nvlink_gbps:.0f} GB/s, "
        f"InfiniBand {links.ib_gbps:.0f} GB/s per GPU; bf16\n"
    )
    out: dict[str, Any] = {"tflops": tflops, "links": links.__dict__, "tables": {}}
    for res in [] if args.published_only else args.resolutions:
        for method in args.methods:
            name = f"{res} {args.num_frames} frames, {method}"
            prof = profile(name, method, RESOLUTIONS[res], args.num_frames, args.steps)
            for placement in ("nvlink", "ib"):
                print(table(prof, tflops, links, placement) + "\n")
                out["tables"][f"{name}, {placement}"] = {
                    str(p): {s: predict(prof, tflops, links, p, s, placement) for s in ("sp", "cfg+sp", "dp")}
                    for p in range(1, 9)
                }
    if not args.no_published:
        prof = profile("720p 16 s, none", "none", RESOLUTIONS["720p"], 408, args.steps, sp_sizes=(1, 2), halves=False)
        text, figures = published_comparison(prof, tflops, links)
        print(text)
        out["published_comparison"] = figures
    if args.json:
        atomic_write_json(args.json, out)  # never a half-written file
    return out


if __name__ == "__main__":
    main()
