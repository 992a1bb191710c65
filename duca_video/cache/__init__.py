"""Feature caching for STDiT3: DuCa and the baselines, as one plugin on Open-Sora's block structure.

controller = duca_video.cache.enable(model, "duca")        # or "toca", "fora", "pab", ... or a config
... sample ...
print(controller.summary()); controller.cache_bytes
duca_video.cache.disable(model)

Our sampler announces its samples and steps. For upstream Open-Sora's `RFLOW.sample`, which announces nothing,
give the cache the sampler's settings and it follows the model's forward calls:
controller = duca_video.cache.enable(upstream_stdit3, "duca", scheduler=rflow)   # or num_sampling_steps=30
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
