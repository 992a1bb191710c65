"""One dataclass per caching method. Every field is validated; unknown methods and fields are errors.

Schedules are written in steps of the sampler (0 = noisiest). Step kinds:
  full          every module computed for every token (and the cache refreshed);
  conservative  cached module outputs reused; the modules in `recompute` are recomputed for a subset of tokens;
  aggressive    the whole block stack reused (the last block's cached output); embedders and final layer run.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

STEP_KINDS = ("full", "conservative", "aggressive")
MODULES = ("attn", "cross", "mlp")
SELECTORS = ("random", "random_frame", "k_norm", "v_norm", "cross_entropy", "min_similarity", "max_similarity")


def _check(cond: bool, method: str, name: str, allowed: str, value: Any) -> None:
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
    hints = typing.get_type_hints(type(config))
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

    def validate(self) -> None:
        """Raise ValueError naming the field and the allowed values."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass
class NoneConfig(CacheConfig):
    """No caching: the plugin stays out of the way (the reference the others are compared to)."""

    method: ClassVar[str] = "none"


@dataclass
class TokenCacheConfig(CacheConfig):
    """The schedule family shared by DuCa, ToCa, FORA, aggressive-only and conservative-only caching.

    Step s (0-based) is full while s < warmup_steps; afterwards its kind is pattern[s % cycle]. In full steps
    cross-attention is recomputed only when s % cross_cycle == 0 (else its cached output is reused whole).
    Conservative steps recompute the modules in `recompute` for a fraction `recompute_ratio` (= 1 - R) of the
    tokens picked by `selector`, plus `age_bonus` x (steps since the token was last computed).
    """

    warmup_steps: int = 3
    cycle: int = 3
    pattern: tuple[str, ...] = ("full", "conservative", "aggressive")
    cross_cycle: int = 6
    recompute_ratio: float = 0.1495
    recompute: tuple[str, ...] = ("mlp",)
    selector: str = "random"
    age_bonus: float = 0.0

    def validate(self) -> None:
        m = self.method
        self.pattern, self.recompute = tuple(self.pattern), tuple(self.recompute)
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, m, "warmup_steps", "int >= 0",
               self.warmup_steps)  # fmt: skip
        _check(isinstance(self.cycle, int) and self.cycle >= 1, m, "cycle", "int >= 1", self.cycle)
        _check(isinstance(self.cross_cycle, int) and self.cross_cycle >= 1, m, "cross_cycle", "int >= 1",
               self.cross_cycle)  # fmt: skip
        _check(len(self.pattern) == self.cycle, m, "pattern", f"a sequence of {self.cycle} (= cycle) step kinds",
               self.pattern)  # fmt: skip
        bad = [k for k in self.pattern if k not in STEP_KINDS]
        _check(not bad, m, "pattern", f"entries from {STEP_KINDS}", self.pattern)
        _check("full" in self.pattern, m, "pattern", "at least one 'full' step per cycle", self.pattern)
        _check(0.0 <= self.recompute_ratio <= 1.0, m, "recompute_ratio", "a number in [0, 1]", self.recompute_ratio)
        bad = [k for k in self.recompute if k not in MODULES]
        _check(not bad, m, "recompute", f"a subset of {MODULES}", self.recompute)
        _check(self.selector in SELECTORS, m, "selector", str(SELECTORS), self.selector)
        _check(self.age_bonus >= 0, m, "age_bonus", "a number >= 0", self.age_bonus)


@dataclass
class DuCaConfig(TokenCacheConfig):
    """Dual Feature Caching. The default reproduces the published Open-Sora schedule: 3 full warm-up steps,
    then cycles of (full, conservative, aggressive), cross-attention refreshed every 6 steps, 14.95% of the
    tokens' MLP recomputed in conservative steps, random token selection. `preset="paper"` follows the paper's
    text instead (`enable(model, "duca", preset="paper")`): cycle N=5 of (full, conservative, aggressive,
    conservative, aggressive), R=0.9, cross-attention refreshed with every full step."""

    method: ClassVar[str] = "duca"


@dataclass
class ToCaConfig(TokenCacheConfig):
    """Token-wise caching, conservative only (the published Open-Sora setting: full every 3 steps after 3
    warm-up steps, cross-attention every 6, 14.95% of MLP tokens, selected by cross-attention entropy)."""

    method: ClassVar[str] = "toca"
    pattern: tuple[str, ...] = ("full", "conservative", "conservative")
    selector: str = "cross_entropy"


@dataclass
class ConservativeConfig(TokenCacheConfig):
    """Conservative-only caching with random selection (ToCa's schedule, DuCa's selector)."""

    method: ClassVar[str] = "conservative"
    pattern: tuple[str, ...] = ("full", "conservative", "conservative")


@dataclass
class AggressiveConfig(TokenCacheConfig):
    """Aggressive-only: the whole block stack is reused between full steps."""

    method: ClassVar[str] = "aggressive"
    pattern: tuple[str, ...] = ("full", "aggressive", "aggressive")
    cross_cycle: int = 1
    recompute: tuple[str, ...] = ()


@dataclass
class ForaConfig(TokenCacheConfig):
    """FORA: every module's output is reused for N-1 steps (the residual stream still runs)."""

    method: ClassVar[str] = "fora"
    warmup_steps: int = 0
    pattern: tuple[str, ...] = ("full", "conservative", "conservative")
    cross_cycle: int = 1
    recompute_ratio: float = 0.0
    recompute: tuple[str, ...] = ()


@dataclass
class PABConfig(CacheConfig):
    """Pyramid Attention Broadcast (VideoSys' Open-Sora defaults): inside the timestep window
    (threshold[0] < t < threshold[1]) an attention output is recomputed only every `range` steps and
    broadcast (reused) in between; the MLP always runs unless mlp_range > 1."""

    method: ClassVar[str] = "pab"
    spatial_range: int = 2
    temporal_range: int = 4
    cross_range: int = 6
    mlp_range: int = 1
    threshold: tuple[float, float] = (450.0, 930.0)

    def validate(self) -> None:
        for name in ("spatial_range", "temporal_range", "cross_range", "mlp_range"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, self.method, name, "int >= 1", value)
        self.threshold = tuple(float(v) for v in self.threshold)
        _check(len(self.threshold) == 2 and self.threshold[0] < self.threshold[1], self.method, "threshold",
               "(low, high) timesteps with low < high", self.threshold)  # fmt: skip


@dataclass
class TeaCacheConfig(CacheConfig):
    """TeaCache: skip the block stack (add the previous residual) while the accumulated rescaled relative L1
    change of the first block's modulated input stays under `threshold`; first and last steps always run."""

    method: ClassVar[str] = "teacache"
    threshold: float = 0.1
    # Open-Sora 1.2 polynomial (highest power first) from the TeaCache authors.
    coefficients: tuple[float, ...] = (2.17546007e02, -1.18329252e02, 2.68662585e01, -4.59364272e-02, 4.84426240e-02)

    def validate(self) -> None:
        _check(self.threshold >= 0, self.method, "threshold", "a number >= 0", self.threshold)
        self.coefficients = tuple(float(c) for c in self.coefficients)
        _check(len(self.coefficients) >= 1, self.method, "coefficients", "a non-empty polynomial", self.coefficients)


@dataclass
class StepsConfig(CacheConfig):
    """Fewer sampling steps, no caching: the pipeline runs the sampler with `num_steps` steps."""

    method: ClassVar[str] = "steps"
    num_steps: int = 12

    def validate(self) -> None:
        _check(isinstance(self.num_steps, int) and self.num_steps >= 1, self.method, "num_steps", "int >= 1",
               self.num_steps)  # fmt: skip


METHODS: dict[str, type[CacheConfig]] = {
    c.method: c
    for c in (NoneConfig, DuCaConfig, ToCaConfig, ForaConfig, AggressiveConfig, ConservativeConfig, PABConfig,
              TeaCacheConfig, StepsConfig)
}  # fmt: skip

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "duca": {
        "published": {},
        "paper": dict(warmup_steps=0, cycle=5, cross_cycle=5, recompute_ratio=0.1,
                      pattern=("full", "conservative", "aggressive", "conservative", "aggressive")),
    }
}  # fmt: skip


def make_config(method: str | CacheConfig, **overrides: Any) -> CacheConfig:
    """A validated config from a method name (or a config object) and field overrides."""
    if isinstance(method, CacheConfig):
        config = dataclasses.replace(method, **overrides) if overrides else method
        _check_types(config)
        config.validate()
        return config
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


__all__ = [
    "METHODS", "MODULES", "PRESETS", "SELECTORS", "STEP_KINDS", "AggressiveConfig", "CacheConfig",
    "ConservativeConfig", "DuCaConfig", "ForaConfig", "NoneConfig", "PABConfig", "StepsConfig", "TeaCacheConfig",
    "ToCaConfig", "TokenCacheConfig", "make_config",
]  # fmt: skip
