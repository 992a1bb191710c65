"""The Python API checks its arguments as the command line does: a wrong seed, an empty batch or a copied cached
model is named with what is allowed, before any work (never a silent wrap-around or a cache shared by two models)."""

from __future__ import annotations

import copy

import pytest
import torch

from duca_video import cache
from duca_video.sampling.rflow import RFlowSampler
from tests.helpers import tiny_model


@pytest.mark.parametrize("seed", ["abc", -1, 2**63, 1.5, True, [], [1, "2"], [1, -2]])
def test_enable_refuses_a_seed_that_is_not_one(seed):
    allowed = r"cache.enable: seed=.* is not allowed; allowed: None, an int in 0..2\*\*63-1"
    with pytest.raises(ValueError, match=allowed):
        cache.enable(tiny_model(), "duca", num_sampling_steps=4, seed=seed)


@pytest.mark.parametrize("seed", [None, 0, 2**63 - 1, [3, 4], (5,)])
def test_enable_takes_every_valid_seed(seed):
    model = tiny_model()
    cache.enable(model, "duca", num_sampling_steps=4, seed=seed)
    cache.disable(model)


def _inputs(batch: int) -> dict:
    model = tiny_model()
    z = torch.randn(batch, model.config.in_channels, 2, 4, 4)
    y = torch.randn(batch, 1, model.config.model_max_length, model.config.caption_channels)
    extra = {
        k: torch.full((batch,), v) for k, v in (("height", 32.0), ("width", 32.0), ("num_frames", 2.0), ("fps", 8.0))
    }
    return {"model": model, "z": z, "y": y, "y_null": torch.zeros_like(y), "model_kwargs": extra}


def _sample(a: dict, **kwargs) -> torch.Tensor:
    return RFlowSampler(num_sampling_steps=2, use_timestep_transform=False).sample(
        a["model"], a["z"], a["y"], a["y_null"], model_kwargs=a["model_kwargs"], progress=False, **kwargs
    )


@pytest.mark.parametrize("seed", ["abc", -5, 2**64, [1]])  # [1]: one seed for a batch of 2
def test_the_sampler_refuses_a_bad_seed(seed):
    a = _inputs(2)
    with pytest.raises(ValueError, match="sample: "):
        _sample(a, seed=seed)


def test_the_sampler_refuses_an_empty_batch():
    a = _inputs(0)
    with pytest.raises(ValueError, match=r"z has batch 0: give at least one video"):
        _sample(a)


def test_a_cached_model_cannot_be_deep_copied_silently():
    model = tiny_model()
    cache.enable(model, "duca", num_sampling_steps=4)
    with pytest.raises(TypeError, match=r"copy.deepcopy of a model with the cache enabled.*cache.disable\(model\)"):
        copy.deepcopy(model)
    cache.disable(model)
    copy.deepcopy(model)  # without the cache: a plain module


def test_enable_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match="model must be an STDiT3 \\(torch.nn.Module\\), got str"):
        cache.enable("model.safetensors", "duca")


def test_the_sampler_runs_with_one_seed_per_video():
    assert _sample(_inputs(2), seed=[1, 2]).shape[0] == 2
