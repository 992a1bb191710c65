"""What can be checked of a run before a model is loaded besides its plan (`duca_video.jobs.plan`): weight
paths, cache settings, device. A bad input fails here, in seconds, with a message saying
which input and how to fix it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .loader import WEIGHT_ENV_VARS
from .schema import ConfigError, InferenceConfig

__all__ = ["InputError", "check_cache_settings", "check_model_weights", "resolve_device", "resolve_weights"]


class InputError(ValueError):
    """An input of the run is unusable (weights, save folder, device); the message says which and how to fix it."""


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
                problems.append(
                    f"{section} ({sec.type}): no weights given; pass {flag} PATH, set {env}=PATH or "
                    f"set {section}.from_pretrained in the config"
                )
            paths[section] = None
            continue
        if not Path(path).expanduser().exists():
            problems.append(
                f"{section} ({sec.type}): {path!r} does not exist (from {flag}, {section}.from_pretrained "
                f"or {env}); nothing is downloaded, point it at a local copy"
            )
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
        steps = config.sampler_settings().get("num_sampling_steps")
        _check_fewer_steps(cfg, steps)
        try:
            config.check_run(steps or cfg.scheduler.num_sampling_steps)
        except ValueError as exc:
            raise ConfigError(f"cache: {exc}") from None


def _check_fewer_steps(cfg: InferenceConfig, steps: int | None) -> None:
    """A variant that sets the step count runs fewer steps than the job's loop, never more (a contradiction:
    `--cache steps --cache-opt num_steps=50` on a 6-step job would run 50)."""
    base = cfg.scheduler.num_sampling_steps
    if steps is not None and steps > base:
        raise ConfigError(
            f"cache: {cfg.cache.method}.num_steps={steps} is more than the job's "
            f"num_sampling_steps ({base}); allowed: 1..{base}"
        )


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
        raise InputError(
            f"device {name!r}: this machine has {count} CUDA device(s); allowed: auto, cpu, cuda, "
            f"cuda:0 .. cuda:{count - 1}"
        )
    return device
