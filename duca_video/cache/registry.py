"""The one list of caching methods: the CLI, the config schema, benchmarks and `enable` all read it.

Adding a method: write `methods/NAME.py` (a config dataclass with `method = "NAME"` and `make_policy`, and its
policy), list its module below; nothing else changes.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import CacheConfig

METHOD_MODULES = (
    "none",
    "token",
    "pab",
    "teacache",
    "taylorseer",
    "fbcache",
    "magcache",
    "fastercache",
    "easycache",
    "auto",
)

METHODS: dict[str, type[CacheConfig]] = {}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {}
for _name in METHOD_MODULES:
    _module = importlib.import_module(f"{__package__}.methods.{_name}")
    for _cls in _module.METHODS:
        METHODS[_cls.method] = _cls
    PRESETS.update(getattr(_module, "PRESETS", {}))

__all__ = ["METHODS", "METHOD_MODULES", "PRESETS"]
