"""Which settings change a video's pixels, and so its identity (what a record must show for a resume to keep it).

"Changes the pixels" means changes what is computed. Layouts that compute the same video up to floating-point
rounding (sequence parallelism, offloading the cache, compiled blocks: each has its equivalence test) are left
out, so a job resumed on another number of GPUs keeps its videos. A method whose computation depends on the
layout says so (`CacheConfig.layout_identity`), and only for the layouts where it does.
"""

from __future__ import annotations

import pytest

from duca_video.cache.registry import METHODS
from duca_video.configs import config_from_args
from duca_video.jobs import VideoIdentity, load_prompts, plan_batches

BASE = ["--config", "configs/tiny.py", "--prompt", "a red circle moving left", "--cfg-scale", "4"]
WEIGHTS = {"model": None, "vae": None, "text_encoder": None}

# flag -> does it change what is computed, per method (the default: for no method)
PIXEL_CHANGING = {
    "--dtype bf16": set(METHODS),  # another precision for every method
    "--num-sampling-steps 20": set(METHODS) - {"steps"},  # `steps` runs its own count (12 of at most 20 here)
    "--cfg-parallel": {"fastercache"},  # no rank holds both CFG halves: its CFG-Cache cannot run
    "--sp-size 2": set(),
    "--cache-offload": set(),  # bitwise the same latent (test_cache_offload)
    "--compile": set(),  # the eager video up to inductor's rounding (test_compile)
    "--batch-size 2": set(),  # per-video seeds and decisions (test_per_video_decisions)
}


def _identity(method: str, flags: str) -> dict:
    cfg, _ = config_from_args([*BASE, "--cache", method, *flags.split()])
    job = plan_batches(cfg, load_prompts(cfg))[0][0]
    return VideoIdentity(cfg, WEIGHTS)(job)


@pytest.mark.parametrize("flags", sorted(PIXEL_CHANGING))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_identity_holds_exactly_the_pixel_changing_settings(method, flags):
    changed = _identity(method, flags) != _identity(method, "")
    assert changed == (method in PIXEL_CHANGING[flags]), (method, flags)


def test_fastercache_without_its_cfg_cache_is_the_same_video_on_any_layout():
    assert _identity("fastercache", "--cache-opt cfg_cache=False --cfg-parallel") == _identity(
        "fastercache", "--cache-opt cfg_cache=False"
    )
    assert _identity("fastercache", "--cfg-parallel")["layout"] == {"cfg_cache_off": "cfg_parallel"}


def test_a_step_variant_that_runs_more_steps_than_the_job_is_refused(tmp_path):
    from duca_video.configs import ConfigError
    from duca_video.configs.preflight import check_cache_settings

    cfg, _ = config_from_args([*BASE, "--cache", "steps", "--cache-opt", "num_steps=50", "--num-sampling-steps", "6"])
    with pytest.raises(
        ConfigError,
        match=r"steps.num_steps=50 is more than the job's num_sampling_steps \(6\); "
        r"allowed: 1..6",
    ):
        check_cache_settings(cfg)
