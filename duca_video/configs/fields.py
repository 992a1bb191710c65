"""Typed config fields: values converted to a field's declared type, or an error naming the key and what is
allowed (the machinery under `schema.py`'s sections)."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

from duca_video.compat import UNION_TYPES, type_hints


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed; the message names the key."""


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in UNION_TYPES:
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin is tuple:
        args = typing.get_args(hint)
        return f"{len(args)} ints" if Ellipsis not in args else "a list of ints"
    if origin is list:
        return "a list of strings"
    if origin is dict:
        return "a dict"
    return {int: "an int", float: "a number", bool: "True or False", str: "a string"}.get(hint, str(hint))


_NO = object()  # "this type does not take the value"


def _plain(value: Any, hint: Any) -> Any:
    """`value` as the scalar type `hint` (bool, int, float, str), or _NO. An int is not a bool and vice versa."""
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if isinstance(value, bool):
        return _NO
    if hint is int:
        return value if isinstance(value, int) else _NO
    if hint is float:
        return float(value) if isinstance(value, (int, float)) else _NO
    if hint is str:
        return value if isinstance(value, str) else _NO
    return _NO


def _container(value: Any, origin: Any, args: tuple) -> Any:
    """`value` as a tuple of ints, a list of strings or a dict (the containers the config uses), or _NO."""
    if origin is tuple and isinstance(value, (list, tuple)) and (Ellipsis in args or len(value) == len(args)):
        return tuple(_coerce(v, int) for v in value)
    if origin is list and isinstance(value, (list, tuple)):
        return [_coerce(v, str) for v in value]
    if origin is dict and isinstance(value, dict):
        return dict(value)
    return _NO


def _union(value: Any, args: tuple) -> Any:
    for arg in args:
        try:
            return _coerce(value, arg)
        except TypeError:
            continue
    return _NO


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as type `hint`, or raise TypeError. Only the types the config uses are handled."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        out = value if value in args else _NO
    elif origin in UNION_TYPES:
        out = _union(value, args)
    elif hint is type(None):
        out = None if value is None else _NO
    elif origin in (tuple, list, dict):
        out = _container(value, origin, args)
    else:
        out = _plain(value, hint)
    if out is _NO:
        raise TypeError(_describe(hint))
    return out


def _build(cls: type, values: Any, where: str, extra_ok: bool = False) -> Any:
    """Instantiate dataclass `cls` from a dict, type-checking each field. With `extra_ok`, keys that are not
    fields go to the `extra` field (the section checks them against what its model accepts)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a dict, got {type(values).__name__}")
    hints = type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"]
    unknown = sorted(k for k in values if k not in names)
    if unknown and not extra_ok:
        raise ConfigError(f"{where}: unknown key {', '.join(map(repr, unknown))}; allowed: {', '.join(names)}")
    kwargs: dict[str, Any] = {}
    for name in names:
        if name not in values:
            continue
        _check_plain(_key(where, name), values[name])
        try:
            kwargs[name] = _coerce(values[name], hints[name])
        except TypeError as exc:
            raise ConfigError(f"{_key(where, name)}={values[name]!r} is not allowed: expected {exc}") from None
    if extra_ok:
        kwargs["extra"] = {k: values[k] for k in unknown}
    return cls(**kwargs)


def _check_plain(key: str, value: Any) -> None:
    # nan and inf pass every comparison check silently (--cfg-scale nan made a black video); a NUL cannot be
    # part of any path or name.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is not allowed: it must be a finite number")
    if isinstance(value, str) and "\0" in value:
        raise ConfigError(f"{key}={value!r} is not allowed: it contains a NUL character")


def _key(where: str, name: str) -> str:
    return name if not where or where == "config" else f"{where}.{name}"


def _positive(where: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{_key(where, name)}={value!r} is not allowed: it must be > 0")
