"""TeaCache, First-Block Cache and EasyCache decide per video: a video's result does not depend on its batch-mates.

On the trained testbed model, four prompts in one batch give steps where some videos compute and others skip
("mixed:..." / "first_block:..." in the history); each video must equal the same video sampled alone, and the
FLOP replay must count exactly those partial steps."""

import pytest
import torch

from duca_video import cache
from duca_video.metrics.flops import SamplingFlops, flop_counter
from duca_video.sampling.rflow import RFlowSampler
from duca_video.testbed.tiny import load_tiny

PROMPTS = [
    "a large red circle moving left on a dark background",
    "a small blue square moving up on a light background",
    "a large green circle moving right on a dark background",
    "a small yellow square moving down on a dark background",
]
CASES = [
    ("teacache", {"threshold": 0.6}, "mixed"),
    ("fbcache", {"threshold": 0.2}, "first_block"),
    ("easycache", {"threshold": 0.2, "warmup_steps": 2}, "mixed"),
]


@pytest.fixture(scope="module")
def bed():
    return load_tiny("weights/tiny")


def _inputs(bed, rows):
    text = bed.text_encoder.encode([PROMPTS[i] for i in rows])
    null = bed.model.y_embedder.y_embedding
    y_null = null[None, None].expand(len(rows), 1, *null.shape)
    z = torch.stack([torch.randn(3, 8, 16, 16, generator=torch.Generator().manual_seed(i)) for i in rows])
    return z, text["y"], y_null, text["mask"], bed.model_kwargs(len(rows))


def _sample(bed, rows):
    z, y, y_null, mask, kwargs = _inputs(bed, rows)
    sampler = RFlowSampler(num_sampling_steps=12, use_timestep_transform=False, cfg_scale=4.0)
    with torch.no_grad():
        return sampler.sample(bed.model, z, y, y_null, mask, model_kwargs=kwargs, progress=False, seed=list(rows))


@pytest.mark.parametrize("method, options, partial", CASES)
def test_each_video_decides_on_its_own_rows_and_equals_itself_alone(bed, method, options, partial):
    controller = cache.enable(bed.model, method, **options)
    try:
        batched = _sample(bed, range(4))
        kinds = [h["kind"] for h in controller.history]
        assert any(k.startswith(partial + ":") for k in kinds), kinds  # some videos computed, others skipped
        for i in range(4):
            torch.testing.assert_close(batched[i : i + 1], _sample(bed, [i]), atol=1e-5, rtol=0)
    finally:
        cache.disable(bed.model)


@pytest.mark.slow
@pytest.mark.parametrize("method, options, partial", CASES)
def test_flop_replay_counts_the_partial_steps_of_the_run(bed, method, options, partial):
    controller = cache.enable(bed.model, method, **options)
    sampler = RFlowSampler(num_sampling_steps=12, use_timestep_transform=False, cfg_scale=4.0)
    z, y, y_null, mask, kwargs = _inputs(bed, range(4))
    counter = flop_counter()
    try:
        with counter, torch.no_grad():
            sampler.sample(bed.model, z, y, y_null, mask, model_kwargs=kwargs, progress=False, seed=[0, 1, 2, 3])
        kinds = [h["kind"] for h in controller.history]
        tokens = sampler.last_text_tokens
    finally:
        cache.disable(bed.model)
    assert any(k.startswith(partial + ":") for k in kinds)
    replay = SamplingFlops(bed.model, torch.float32, controller.config, sampler)
    assert replay.count(4, tuple(z.shape[1:]), kwargs, kinds, tokens) == counter.get_total_flops()
