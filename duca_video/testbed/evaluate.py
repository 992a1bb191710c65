"""Prompt adherence of a testbed model: generate clips for balanced prompts and read them back analytically.

    OMP_WAIT_POLICY=PASSIVE python -m duca_video.testbed.evaluate --weights weights/tiny --n 192 --steps 30 --cfg 4

(Passive OpenMP waiting keeps a shared CPU machine from thrashing; see scripts/train_tiny.py.)

Prompts cover every colour x shape x direction x background x size combination (192) in a seeded order, so
any n gives near-balanced classes; prompt i starts from noise seeded `seed + i`. The sampler is the model's
own (`testbed.sampler` in config.json: no timestep transform), with the steps and guidance given here.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

from .adherence import CHANCE, adherence
from .grammar import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, SIZES, make_caption
from .tiny import DEFAULT_TINY_DIR, TinyTestbed, load_tiny

__all__ = ["balanced_prompts", "evaluate"]


def balanced_prompts(n: int, seed: int = 0, with_size: bool = True) -> list[str]:
    """n captions cycling through a seeded permutation of every attribute combination."""
    combos = list(itertools.product(COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS, SIZES if with_size else [None]))
    order = torch.randperm(len(combos), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = [combos[order[i % len(combos)]] for i in range(n)]
    return [make_caption(c, s, d, b, size=z) for c, s, d, b, z in picked]


def evaluate(
    bed: TinyTestbed,
    n: int = 192,
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    return_videos: bool = False,
) -> dict[str, Any]:
    """Adherence metrics (see `adherence.adherence`) of n generated clips, plus the settings used."""
    sampler = bed.sampler
    if steps is not None or cfg_scale is not None:
        sampler = dataclasses.replace(
            sampler,
            num_sampling_steps=steps if steps is not None else sampler.num_sampling_steps,
            cfg_scale=cfg_scale if cfg_scale is not None else sampler.cfg_scale,
        )
    prompts = balanced_prompts(n, seed, with_size=bed.data.caption_size)
    start = time.perf_counter()
    videos = torch.cat(
        [
            bed.generate(prompts[i : i + batch_size], [seed + j for j in range(i, min(n, i + batch_size))], sampler)
            for i in range(0, n, batch_size)
        ]
    )
    result = adherence(videos, prompts, bed.data)
    result.update(
        steps=sampler.num_sampling_steps,
        cfg_scale=sampler.cfg_scale,
        seed=seed,
        seconds=round(time.perf_counter() - start, 1),
        chance=CHANCE,
    )
    if return_videos:
        result["videos"], result["prompts"] = videos, prompts
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=DEFAULT_TINY_DIR)
    p.add_argument("--n", type=int, default=192)
    p.add_argument("--steps", type=int, default=None, help="default: the model's config")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale; default: the model's config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", type=Path, default=None, help="also save videos + prompts to this .pt file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bed = load_tiny(args.weights)
    result = evaluate(bed, args.n, args.steps, args.cfg, args.seed, return_videos=args.save is not None)
    if args.save is not None:
        torch.save({"videos": result.pop("videos"), "prompts": result.pop("prompts")}, args.save)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
