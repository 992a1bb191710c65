"""Feature caching for STDiT3: DuCa and the baselines, as one plugin on Open-Sora's block structure.

controller = duca_video.cache.enable(model, "duca")        # or "toca", "fora", "pab", ... or a config
... sample ...
print(controller.summary()); controller.cache_bytes
duca_video.cache.disable(model)
"""

from .config import (
    METHODS,
    AggressiveConfig,
    CacheConfig,
    ConservativeConfig,
    DuCaConfig,
    ForaConfig,
    NoneConfig,
    PABConfig,
    StepsConfig,
    TeaCacheConfig,
    ToCaConfig,
    TokenCacheConfig,
    make_config,
)
from .plugin import CacheController, controller_of, disable, enable, find_blocks
from .schedule import build_schedule, schedule_table

__all__ = [
    "METHODS",
    "AggressiveConfig",
    "CacheConfig",
    "CacheController",
    "ConservativeConfig",
    "DuCaConfig",
    "ForaConfig",
    "NoneConfig",
    "PABConfig",
    "StepsConfig",
    "TeaCacheConfig",
    "ToCaConfig",
    "TokenCacheConfig",
    "build_schedule",
    "controller_of",
    "disable",
    "enable",
    "find_blocks",
    "make_config",
    "schedule_table",
]
