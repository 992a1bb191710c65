"""The base of every method's config: typed, validated fields; unknown methods and fields are errors.

Each method lives in one module of `duca_video.cache.methods` (its config dataclass and its policy); the
registry (`registry.py`) lists them. Schedules are written in steps of the sampler (0 = noisiest). Step kinds:
  full          every module computed for every token (and the cache refreshed);
  conservative  cached module outputs reused (or forecast); some modules recomputed for a subset of tokens;
  aggressive    the whole block stack reused (or forecast); embedders and final layer run.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from duca_video.compat import type_hints

STEP_KINDS = ("full", "conservative", "aggressive")
MODULES = ("attn", "cross", "mlp")
SELECTORS = ("random", "random_frame", "k_norm", "v_norm", "cross_entropy", "min_similarity", "max_similarity")
SCORED_SELECTORS = ("k_norm", "v_norm", "cross_entropy")  # scored from projections a full step computes anyway


def check_field(cond: bool, method: str, name: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"cache method {method!r}: {name}={value!r} is invalid; allowed: {allowed}")


# The values a name field may take, quoted in type errors so that the message says what to write.
_CHOICES = {"pattern": STEP_KINDS, "recompute": MODULES, "selector": SELECTORS}


def _is_number(value: Any) -> bool:
    # bool is an int to Python, never a number to a user: recompute_ratio=True must not read as 1.0.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _typed(name: str, value: Any, hint: Any) -> Any:
    """`value` as the field type `hint`, or raise TypeError saying what is allowed."""
    args = typing.get_args(hint)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and _is_number(value):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if typing.get_origin(hint) is tuple:
        item = args[0]
        if isinstance(value, str) and item is str:
            # "attn,mlp" (as --cache-opt recompute=attn,mlp gives it) is a list of names, never of letters.
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)) and (Ellipsis in args or len(value) == len(args)):
            if item is str and all(isinstance(v, str) for v in value):
                return tuple(value)
            if item is float and all(_is_number(v) for v in value):
                return tuple(float(v) for v in value)
    raise TypeError(_describe(name, hint))


def _describe(name: str, hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        size = "a list of" if Ellipsis in args else f"a list of {len(args)}"
        if args[0] is str:
            return f"{size} names from {_CHOICES.get(name, 'str')} (e.g. {name}=a,b on the command line)"
        return f"{size} finite numbers"
    if name in _CHOICES:
        return f"one of {_CHOICES[name]}"
    return {bool: "True or False", int: "an int", float: "a finite number", str: "a string"}.get(hint, str(hint))


def _check_types(config: CacheConfig) -> None:
    """Every field of `config` has its declared type (converted where that loses nothing, e.g. 1 -> 1.0)."""
    hints = type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        try:
            setattr(config, f.name, _typed(f.name, value, hints[f.name]))
        except TypeError as exc:
            raise ValueError(f"cache method {config.method!r}: {f.name}={value!r} is invalid; allowed: {exc}") from None


@dataclass
class CacheConfig:
    """Base class; `method` names the method in records and in `enable`."""

    method: ClassVar[str] = ""
    # -- capabilities: every flag the engine reads about a method, here and nowhere else ----------------------
    # The method decides from the data at run time (e.g. TeaCache): FLOP replays on meta repeat its decisions.
    data_dependent: ClassVar[bool] = False
    # The policy wraps the whole model call (`CachePolicy.model_forward`), e.g. to run only one CFG half.
    wraps_model_forward: ClassVar[bool] = False
    # The plan's module outputs are plain stored tensors, so a full step may fold them (see methods/token/folding.py).
    fold_ok: ClassVar[bool] = False
    # `update` reads the stored values on a full step too (TaylorSeer's differences): an offloaded cache
    # prefetches them for every step.
    reads_on_update: ClassVar[bool] = False

    def validate(self) -> None:
        """Raise ValueError naming the field and the allowed values."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def sampler_settings(self) -> dict[str, Any]:
        """Sampler settings this variant implies (fewer steps is a sampler setting, not caching); usually none."""
        return {}

    def layout_identity(self, cfg_parallel: bool) -> dict[str, Any]:
        """What of the parallel layout changes this method's video beyond floating-point rounding (recorded in
        the video's identity); empty for a method that computes the same video on any layout."""
        return {}

    def unseen_bytes(self, rows: int, tokens: int, hidden: int, itemsize: int) -> int | None:
        """Bytes this method holds between steps that a meta-device run (every step replayed as full) does not
        store: 0 for a static method; None when a meta run cannot follow its storage (its decisions need data)."""
        return None if self.data_dependent else 0

    def check_run(self, num_steps: int) -> None:
        """Raise ValueError when this method cannot run a loop of `num_steps` steps (checked before any model
        loads; e.g. a calibration made for another step count)."""

    def input_digests(self) -> dict[str, str]:
        """Digests of the files this method reads that change the video (e.g. a calibration), by name: part of
        the video's identity, so a changed file is another video; empty for a method that reads none."""
        return {}

    def summary_lines(self, num_steps: int) -> list[str]:
        """Lines the summary shows before the steps (e.g. how a solved schedule spends its budget)."""
        return []

    def make_policy(self, sample: Any) -> Any:
        """The per-sample policy that carries this method out (see `duca_video.cache.policy`)."""
        raise NotImplementedError(f"cache method {self.method!r} has no policy")


def make_config(method: str | CacheConfig, **overrides: Any) -> CacheConfig:
    """A validated config from a method name (or a config object) and field overrides."""
    if isinstance(method, CacheConfig):
        config = dataclasses.replace(method, **overrides) if overrides else method
        _check_types(config)
        config.validate()
        return config
    from .registry import METHODS, PRESETS  # the registry imports every method module, which import this one

    if method not in METHODS:
        raise ValueError(f"unknown cache method {method!r}; allowed: {', '.join(METHODS)}")
    cls = METHODS[method]
    presets = PRESETS.get(method, {})
    preset = overrides.pop("preset", None)
    if preset is not None and preset not in presets:
        allowed = ", ".join(presets) or "none for this method"
        raise ValueError(f"cache method {method!r}: preset={preset!r} is invalid; allowed: {allowed}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"cache method {method!r} has no field(s) {unknown}; allowed: {sorted(names)}")
    # A preset sets defaults; explicit overrides still win.
    config = cls(**{**presets.get(preset, {}), **overrides})
    _check_types(config)
    config.validate()
    return config


__all__ = ["MODULES", "SCORED_SELECTORS", "SELECTORS", "STEP_KINDS", "CacheConfig", "check_field", "make_config"]
