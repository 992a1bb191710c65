"""Feature caching for STDiT3: DuCa and the baselines, as one plugin on Open-Sora's block structure.

controller = duca_video.cache.enable(model, "duca")        # or "toca", "taylorseer", "pab", ... or a config
... sample ...
print(controller.summary()); controller.cache_bytes
duca_video.cache.disable(model)

Our sampler announces its samples and steps. For upstream Open-Sora's `RFLOW.sample`, which announces nothing,
give the cache the sampler's settings and it follows the model's forward calls:
controller = duca_video.cache.enable(upstream_stdit3, "duca", scheduler=rflow)   # or num_sampling_steps=30

`compile_blocks(model)` compiles the blocks' modules for torch.compile (static shapes per step kind; the cache's
Python stays outside the graphs).

Each method is one module of `methods/` (config dataclass + policy); `registry.METHODS` lists them all, and every
method's config class is exported here.
"""

from .compile import compile_blocks, prepare_compile
from .config import CacheConfig, make_config
from .methods.auto import AutoConfig
from .methods.easycache import EasyCacheConfig
from .methods.fastercache import FasterCacheConfig
from .methods.fbcache import FirstBlockCacheConfig
from .methods.magcache import MagCacheConfig
from .methods.none import NoneConfig, StepsConfig
from .methods.pab import PABConfig
from .methods.taylorseer import TaylorSeerConfig
from .methods.teacache import TeaCacheConfig
from .methods.token import (
    AggressiveConfig,
    ConservativeConfig,
    DuCaConfig,
    DuCaForecastConfig,
    ForaConfig,
    ToCaConfig,
    TokenCacheConfig,
)
from .plugin import CacheController, controller_of, disable, enable
from .policy import CachePolicy, Sample
from .registry import METHODS, PRESETS
from .schedule import build_schedule, schedule_table
from .structure import find_blocks

__all__ = [
    "METHODS",
    "PRESETS",
    "AggressiveConfig",
    "AutoConfig",
    "CacheConfig",
    "CacheController",
    "CachePolicy",
    "ConservativeConfig",
    "DuCaConfig",
    "DuCaForecastConfig",
    "EasyCacheConfig",
    "FasterCacheConfig",
    "FirstBlockCacheConfig",
    "MagCacheConfig",
    "ForaConfig",
    "NoneConfig",
    "PABConfig",
    "Sample",
    "StepsConfig",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "ToCaConfig",
    "TokenCacheConfig",
    "build_schedule",
    "compile_blocks",
    "prepare_compile",
    "controller_of",
    "disable",
    "enable",
    "find_blocks",
    "make_config",
    "schedule_table",
]
