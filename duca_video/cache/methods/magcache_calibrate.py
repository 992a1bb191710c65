"""Calibrate MagCache: run `none` on N prompts and record the per-step magnitude ratios of the stack residual.

    python -m duca_video.cache.methods.magcache_calibrate --config configs/tiny.py --prompts 16 \\
        --out weights/tiny/magcache.json [any scripts/inference.py flag, e.g. --num-sampling-steps 30]

Each sample runs uncached through the real pipeline (text encoder, seeded noise, sampler, CFG batch); after each
step the residual r = stack output - stack input gives g_i = mean over tokens and rows of |r_i| / |r_(i-1)|
(L2 over channels; g_0 = 1). The file holds the mean over the samples (weighted by videos), their spread, and
what was run; it is written atomically. Prompts: --prompt / --prompt-path (the first N), or for a testbed
config without prompts N balanced testbed captions drawn with --prompt-seed (by default not the benchmark's).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...parallel.comm import all_reduce_sum
from ..config import CacheConfig
from ..policy import CachePolicy, Sample
from ..state import STACK

log = logging.getLogger(__name__)


@dataclass
class MagCalibrationConfig(CacheConfig):
    """Computes everything (as `none`) and records each sample's per-step magnitude ratios in `records`."""

    method: ClassVar[str] = "magcache_calibrate"

    def __post_init__(self) -> None:
        self.records: list[tuple[int, list[float]]] = []  # (videos in the sample, ratios per step)

    def make_policy(self, sample: Sample) -> MagCalibrationPolicy:
        return MagCalibrationPolicy(self, sample)


class MagCalibrationPolicy(CachePolicy):
    """Holds one (rows, tokens) tensor of residual norms from the previous step; the outputs are untouched."""

    def __init__(self, config: MagCalibrationConfig, sample: Sample) -> None:
        super().__init__(config, sample)
        self.ratios: list[float] = []

    def update_stack(self, stack_in: torch.Tensor, out: torch.Tensor) -> None:
        norms = (out.float() - stack_in.float()).norm(dim=-1)  # (rows, tokens)
        previous = self.store.get(STACK, "residual_norm")
        self.ratios.append(1.0 if previous is None else self._mean_ratio(norms, previous, out))
        if self.sample.last_step:
            self.store.drop(STACK, "residual_norm")
            videos = self.sample.rows // (2 if self.sample.cfg else 1)
            self.config.records.append((videos, self.ratios))
        else:
            self.store.put(STACK, "residual_norm", norms)

    def _mean_ratio(self, norms: torch.Tensor, previous: torch.Tensor, out: torch.Tensor) -> float:
        ratio = norms / previous.clamp_min(torch.finfo(norms.dtype).tiny)
        layout = self.sample.layout
        if layout is None:
            return float(ratio.mean().item())
        # Under sequence parallelism: the mean over the real tokens of the whole grid (padding excluded).
        valid = layout.local_valid(out.shape[1] // layout.s_local, out.device)[None, :].to(ratio.dtype)
        sums = torch.stack([(ratio * valid).sum(), valid.sum() * ratio.shape[0]]).double()
        sums = all_reduce_sum(sums, layout.group, layout.stats, "magcache_calibration")
        return float((sums[0] / sums[1]).item())


def summarize(records: list[tuple[int, list[float]]]) -> dict[str, Any]:
    """Per-step mean of the samples' ratios (weighted by their videos) and the spread across samples."""
    if not records:
        raise ValueError("magcache calibration: no sample finished, so no ratios were recorded")
    steps = {len(r) for _, r in records}
    if len(steps) != 1:
        raise ValueError(f"magcache calibration: samples ran different step counts {sorted(steps)}")
    total = sum(w for w, _ in records)
    n = steps.pop()
    mean = [sum(w * r[i] for w, r in records) / total for i in range(n)]
    spread = [math.sqrt(sum(w * (r[i] - mean[i]) ** 2 for w, r in records) / total) for i in range(n)]
    return {"num_steps": n, "ratios": [round(m, 6) for m in mean], "ratio_std": [round(s, 6) for s in spread]}


def _prompts(cfg: Any, count: int, prompt_seed: int) -> list[tuple[int, str]]:
    from ...jobs import load_prompts
    from ...testbed.evaluate import balanced_prompts

    if cfg.prompt or cfg.prompt_path:
        return load_prompts(cfg)[:count]
    if cfg.text_encoder.type == "word":
        return list(enumerate(balanced_prompts(count, prompt_seed)))
    raise ValueError("magcache calibration: pass --prompt-path FILE (or --prompt ...) with the prompts to run")


def calibrate(argv: Sequence[str], count: int, prompt_seed: int = 1000) -> dict[str, Any]:
    """Run `none` through the pipeline on `count` prompts (flags as scripts/inference.py's) and return the file's
    content."""
    from ... import cache as cache_lib
    from ... import pipeline
    from ...configs import config_from_args
    from ...configs.preflight import resolve_device, resolve_weights
    from ...jobs import batch_jobs, plan_batches
    from ..calibrate import shown_path

    cfg, _ = config_from_args([*argv, "--cache", "none"])
    cfg.count_flops = False  # nothing here reads FLOPs
    prompts = _prompts(cfg, count, prompt_seed)
    jobs = [j for batch in plan_batches(cfg, prompts) for j in batch]
    weights = resolve_weights(cfg)
    models = pipeline.load_models(cfg, weights, resolve_device(cfg.device))
    config = MagCalibrationConfig()
    cache_lib.enable(models.model, config)
    try:
        for batch in batch_jobs(jobs, cfg.batch_size):
            pipeline.generate(models, cfg, batch, progress=False)
    finally:
        cache_lib.disable(models.model)
    size = list(cfg.size) if cfg.size is not None else None
    return {
        **summarize(config.records),
        "model": shown_path(models.weights.get("model")),
        "prompts": len(jobs),
        "prompt_texts": [j.text for j in jobs],
        "seed": cfg.seed,
        "image_size": size,
        "num_frames": cfg.num_frames,
        "cfg_scale": cfg.scheduler.cfg_scale,
        "dtype": cfg.dtype,
        "made_by": "python -m duca_video.cache.methods.magcache_calibrate " + " ".join(argv),
    }


def main(argv: Sequence[str] | None = None) -> int:
    from ...cli_checks import ToolParser, output_file, positive_int
    from ...io import atomic_write_json

    p = ToolParser(
        prog="python -m duca_video.cache.methods.magcache_calibrate",
        description="Record MagCache's per-step magnitude ratios; other flags are scripts/inference.py's.",
    )
    p.add_argument("--prompts", type=positive_int, default=16, help="how many prompts to run (default 16)")
    p.add_argument("--out", required=True, help="JSON file to write (atomically; its folder must exist)")
    p.add_argument("--prompt-seed", type=int, default=1000, help="testbed configs: seed of the captions drawn")
    args, rest = p.parse_known_args(argv)
    p.check(output_file, args.out, "--out")  # before minutes of sampling, not after
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        data = calibrate(rest, args.prompts, args.prompt_seed)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(args.out, data)
    print(
        f"wrote {args.out}: {data['num_steps']} steps from {data['prompts']} prompt(s); ratios "
        f"{min(data['ratios'])} .. {max(data['ratios'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
