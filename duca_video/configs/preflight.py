"""Everything about a run that can be checked before a model is loaded: prompts and output names, weight
paths, cache settings, device, process group. A bad input fails here, in seconds, with a message saying
which input and how to fix it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from duca_video.conditioning.prompts import ConditionedPrompt
from duca_video.conditioning.setup import condition_prompts, is_conditioned_run
from duca_video.io import PromptError, append_scores, select_prompts, video_name
from duca_video.io.captions import clean_prompt
from duca_video.io.prompts import check_prompt, check_video_name, duplicate_names, load_prompt_lines

from .loader import WEIGHT_ENV_VARS
from .schema import ConfigError, InferenceConfig

__all__ = [
    "MAX_VIDEOS",
    "InputError",
    "VideoJob",
    "check_cache_settings",
    "check_model_weights",
    "load_prompts",
    "plan_batches",
    "resolve_device",
    "resolve_weights",
    "batch_jobs",
    "data_parallel_share",
]


# One run plans every video in memory first; past this, split the job with --start-index / --end-index.
MAX_VIDEOS = 1_000_000


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
    # Image / video conditioning (duca_video.conditioning): None for a plain text-to-video prompt.
    condition: ConditionedPrompt | None = None
    texts: tuple[str, ...] = ()  # the encoder's text for each loop (--loop); () means `text` for every loop

    def __post_init__(self) -> None:
        check_video_name(self.name)  # whoever planned the job, its files stay inside the save folder


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
    """(index, prompt) for the prompts this run generates, every one checked (readable text, a file name of
    its own) before anything is loaded: a bad prompt stops the run here instead of failing its whole batch."""
    if cfg.prompt:
        prompts = select_prompts(cfg.prompt, cfg.start_index, cfg.end_index, "--prompt")
        where = {i: f"prompt {i} (--prompt)" for i, _ in prompts}
    elif cfg.prompt_path is None:
        raise PromptError("no prompts: pass --prompt TEXT or --prompt-path FILE (or set prompt / prompt_path)")
    else:
        lines = load_prompt_lines(cfg.prompt_path)
        source = f"prompt file {cfg.prompt_path!r}"
        prompts = select_prompts([p for _, p in lines], cfg.start_index, cfg.end_index, source)
        where = {i: f"prompt {i} ({source}, line {lines[i][0]})" for i, _ in prompts}
    for i, prompt in prompts:
        check_prompt(prompt, where[i])
    if len(prompts) * cfg.num_sample > MAX_VIDEOS:
        raise PromptError(
            f"{len(prompts)} prompt(s) x num_sample {cfg.num_sample} = {len(prompts) * cfg.num_sample} "
            f"videos; one run plans at most {MAX_VIDEOS}: split it with --start-index / --end-index"
        )
    clashes = duplicate_names([(i, p, _name(cfg, i, p, k)) for i, p in prompts for k in range(cfg.num_sample)])
    if len(clashes) > 10:
        clashes = [*clashes[:10], f"... and {len(clashes) - 10} more"]
    if clashes:
        raise PromptError("prompts that would write the same file (give each prompt once, or drop "
                          "--prompt-as-path):\n  " + "\n  ".join(clashes))  # fmt: skip
    return prompts


def _name(cfg: InferenceConfig, index: int, prompt: str, k: int) -> str:
    return video_name(index, prompt, k, cfg.num_sample, cfg.prompt_as_path, cfg.sample_name)


def encoder_text(cfg: InferenceConfig, index: int, prompt: str) -> str:
    """What the text encoder sees for `prompt`, as upstream builds it: the score suffixes appended, then Open-Sora's
    caption cleaning (twice) unless `clean_prompts` is off. A prompt that cleans to nothing is refused."""
    text = append_scores(prompt, cfg.aes, cfg.flow, cfg.camera_motion)
    if not cfg.clean_prompts:
        return text
    cleaned = clean_prompt(text)
    if not cleaned.strip():
        raise PromptError(
            f"prompt {index} ({prompt[:80]!r}) is empty after Open-Sora's prompt cleaning (links, ids and shop "
            "words are removed); reword it, or pass --no-clean-prompts to send it as is"
        )
    return cleaned


def plan_batches(cfg: InferenceConfig, prompts: list[tuple[int, str]]) -> list[list[VideoJob]]:
    """Open-Sora's order: batches of prompts, and within a batch the k-th sample of each (seed + k) together.
    Conditioned prompts (references, mask strategy, loops) are parsed and checked here, before any model."""
    conditions = _conditions(cfg, prompts)
    texts = {i: _texts(cfg, i, p, conditions.get(i)) for i, p in prompts}
    batches = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        for k in range(cfg.num_sample):
            batches.append([
                VideoJob(i, p, texts[i][0], k, cfg.seed + k, _name(cfg, i, p, k), conditions.get(i),
                         texts[i] if conditions.get(i) is not None else ())
                for i, p in chunk
            ])  # fmt: skip
    return batches


def _conditions(cfg: InferenceConfig, prompts: list[tuple[int, str]]) -> dict[int, ConditionedPrompt | None]:
    if not is_conditioned_run(cfg) and not any("{" in p or p.startswith("|") for _, p in prompts):
        return {}
    total = len(cfg.prompt) if cfg.prompt else len(load_prompt_lines(cfg.prompt_path)) if cfg.prompt_path else 0
    source = "--prompt" if cfg.prompt else f"prompt file {cfg.prompt_path!r}"
    where = {i: f"prompt {i} ({source})" for i, _ in prompts}
    return condition_prompts(cfg, prompts, where, total)


def _texts(cfg: InferenceConfig, index: int, prompt: str, cond: ConditionedPrompt | None) -> tuple[str, ...]:
    """What the encoder sees in each loop: the prompt's text for that loop (no JSON part), with the score
    suffixes and Open-Sora's cleaning applied to each segment, as upstream."""
    if cond is None:
        return (encoder_text(cfg, index, prompt),)
    return tuple(encoder_text(cfg, index, cond.text_for_loop(loop)) for loop in range(cfg.loop))


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
    if paths["model"] is not None:
        check_model_weights(cfg, paths["model"])
    return paths


def check_model_weights(cfg: InferenceConfig, path: str) -> None:
    """The STDiT3 checkpoint's headers and config.json are readable and its architecture is valid, found
    without reading a weight (a truncated download fails here, not after the text encoder has loaded)."""
    from duca_video.models import STDiT3Config
    from duca_video.models.checkpoint import CheckpointError, check_checkpoint, config_path, read_config

    try:
        check_checkpoint(path)
        saved = read_config(path) or {}
    except (CheckpointError, FileNotFoundError) as exc:
        raise InputError(f"model weights: {exc}") from None
    fields = {f.name for f in dataclasses.fields(STDiT3Config)}
    arch = {k: v for k, v in saved.items() if k in fields}  # as build_model reads it
    try:
        STDiT3Config.from_dict({**arch, **cfg.model.extra})
    except (TypeError, ValueError) as exc:
        given = f"{config_path(path)}, then the config's model fields" if arch else "the config's model fields"
        raise InputError(f"model architecture ({given}): {exc}") from None


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
            config = make_config(cfg.cache.method, **cfg.cache.overrides)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cache: {exc}") from None
        _check_fewer_steps(cfg, config.sampler_settings().get("num_sampling_steps"))


def _check_fewer_steps(cfg: InferenceConfig, steps: int | None) -> None:
    """A variant that sets the step count runs fewer steps than the job's loop, never more (a contradiction:
    `--cache steps --cache-opt num_steps=50` on a 6-step job would run 50)."""
    base = cfg.scheduler.num_sampling_steps
    if steps is not None and steps > base:
        raise ConfigError(f"cache: {cfg.cache.method}.num_steps={steps} is more than the job's "
                          f"num_sampling_steps ({base}); allowed: 1..{base}")  # fmt: skip


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`, checked against the devices this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdecimal()):
        raise InputError(f"device {name!r} is not allowed; allowed: auto, cpu, cuda, cuda:N (N = 0, 1, ...)")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r}: CUDA is not available here; use --device cpu or auto")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= count:
        raise InputError(f"device {name!r}: this machine has {count} CUDA device(s); allowed: auto, cpu, cuda, "
                         f"cuda:0 .. cuda:{count - 1}")  # fmt: skip
    return device
