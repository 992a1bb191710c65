"""Everything about a run that can be checked before a model is loaded: prompts and output names, weight
paths, cache settings, device, process group. A bad input fails here, in seconds, with a message saying
which input and how to fix it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from duca_video.io import PromptError, append_scores, load_prompt_file, select_prompts, video_name

from .loader import WEIGHT_ENV_VARS
from .schema import ConfigError, InferenceConfig

__all__ = [
    "InputError",
    "VideoJob",
    "check_cache_settings",
    "load_prompts",
    "plan_batches",
    "resolve_device",
    "resolve_weights",
    "batch_jobs",
    "data_parallel_share",
]


class InputError(ValueError):
    """An input of the run is unusable (weights, save folder, device); the message says which and how to fix it."""


@dataclass(frozen=True)
class VideoJob:
    index: int  # position in the prompt list
    prompt: str  # as the user wrote it
    text: str  # as the text encoder sees it (with Open-Sora's score suffixes)
    k: int  # sample number for this prompt
    seed: int
    name: str


def batch_jobs(jobs: Sequence[VideoJob], size: int) -> list[list[VideoJob]]:
    """Batches of up to `size` jobs, in job order. Every video draws its noise and its token selection from
    its own seed, so how videos are batched does not change any of them."""
    jobs = list(jobs)
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def data_parallel_share(prompts: list, dp_size: int, dp_rank: int) -> list:
    """The contiguous range of prompts one data-parallel group generates (the groups' shares are disjoint and
    cover every prompt; a prompt's seed does not depend on which group draws it)."""
    per, extra = divmod(len(prompts), dp_size)
    start = dp_rank * per + min(dp_rank, extra)
    return prompts[start : start + per + (1 if dp_rank < extra else 0)]


def load_prompts(cfg: InferenceConfig) -> list[tuple[int, str]]:
    if cfg.prompt:
        return select_prompts(cfg.prompt, cfg.start_index, cfg.end_index, "--prompt")
    if cfg.prompt_path is None:
        raise PromptError("no prompts: pass --prompt TEXT or --prompt-path FILE (or set prompt / prompt_path)")
    prompts = load_prompt_file(cfg.prompt_path)
    return select_prompts(prompts, cfg.start_index, cfg.end_index, f"prompt file {cfg.prompt_path!r}")


def plan_batches(cfg: InferenceConfig, prompts: list[tuple[int, str]]) -> list[list[VideoJob]]:
    """Open-Sora's order: batches of prompts, and within a batch the k-th sample of each (seed + k) together."""
    batches = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        for k in range(cfg.num_sample):
            batches.append([
                VideoJob(i, p, append_scores(p, cfg.aes, cfg.flow, cfg.camera_motion), k, cfg.seed + k,
                         video_name(i, p, k, cfg.num_sample, cfg.prompt_as_path, cfg.sample_name))
                for i, p in chunk
            ])  # fmt: skip
    return batches


def resolve_weights(cfg: InferenceConfig) -> dict[str, str | None]:
    """Weight path per section: flag / config field first, then the environment variable. Every missing or
    absent path is reported at once, before anything is loaded."""
    paths: dict[str, str | None] = {}
    problems = []
    for section, (env, flag) in WEIGHT_ENV_VARS.items():
        sec = getattr(cfg, section)
        path = sec.from_pretrained
        if path is None and sec.needs_weights:
            path = os.environ.get(env) or None
        if path is None:
            if sec.needs_weights:
                problems.append(f"{section} ({sec.type}): no weights given; pass {flag} PATH, set {env}=PATH or "
                                f"set {section}.from_pretrained in the config")  # fmt: skip
            paths[section] = None
            continue
        if not Path(path).expanduser().exists():
            problems.append(f"{section} ({sec.type}): {path!r} does not exist (from {flag}, {section}.from_pretrained "
                            f"or {env}); nothing is downloaded, point it at a local copy")  # fmt: skip
        paths[section] = str(Path(path).expanduser())
    spatial = cfg.vae.spatial_from_pretrained
    if spatial is not None and not Path(spatial).expanduser().exists():
        problems.append(f"vae.spatial_from_pretrained {spatial!r} does not exist")
    if problems:
        raise InputError("missing weights:\n  " + "\n  ".join(problems))
    return paths


def check_cache_settings(cfg: InferenceConfig) -> None:
    if cfg.cache.method == "none":
        return  # the cache package is not needed at all
    try:
        from duca_video import cache as cache_lib
    except ImportError as exc:
        raise InputError(
            f"cache method {cfg.cache.method!r} needs duca_video.cache, which failed to import: {exc}"
        ) from exc
    make_config = getattr(cache_lib, "make_config", None)
    if make_config is not None:  # validates before the models load; enable() validates again anyway
        try:
            make_config(cfg.cache.method, **cfg.cache.overrides)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cache: {exc}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r}: CUDA is not available here; use --device cpu or auto")
    return device
