"""Inference configuration: typed sections with Open-Sora 1.2's field names, config files and CLI flags."""

from .loader import WEIGHT_ENV_VARS, apply_args, build_parser, config_from_args, load_config, read_config_file
from .schema import (
    CACHE_METHODS,
    DTYPES,
    CacheSection,
    ConfigError,
    InferenceConfig,
    ModelSection,
    SchedulerSection,
    TextEncoderSection,
    VAESection,
)

__all__ = [
    "CACHE_METHODS",
    "DTYPES",
    "WEIGHT_ENV_VARS",
    "CacheSection",
    "ConfigError",
    "InferenceConfig",
    "ModelSection",
    "SchedulerSection",
    "TextEncoderSection",
    "VAESection",
    "apply_args",
    "build_parser",
    "config_from_args",
    "load_config",
    "read_config_file",
]
