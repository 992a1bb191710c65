"""The cached sampling loop moves no index tensors to the device per step, and reads no device values per forward.

Random token selections are drawn for the whole sample at its first forward and copied to the device once; a
conservative step only slices them. On the CPU there is no device to copy to, so the spy counts the `.to(...)`
calls the cache makes on index tensors (int64 / bool) with a device argument, per sampling step: before
pre-drawing, every conservative step made one per recomputing block.
"""

import sys

import pytest
import torch

from duca_video import cache
from duca_video.cache.methods.token import selection as sel
from duca_video.sampling.events import register_listener, unregister_listener
from tests.helpers import sample, tiny_model

STEPS = 10
CACHE_DIR = "duca_video/cache/"


class IndexMoveSpy:
    """Counts, per sampling step, the cache's `.to(device)` calls on int64 / bool tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.step, self.moves = model, None, {}
        self._to = torch.Tensor.to

    def on_sample_start(self, event) -> None:
        self.step = "start"

    def on_step_start(self, event) -> None:
        self.step = event.index

    def on_sample_end(self) -> None:
        self.step = None

    def _spy(self, tensor, *args, **kwargs):
        moves_device = "device" in kwargs or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args)
        caller = sys._getframe(2).f_code.co_filename  # past the lambda standing in for Tensor.to.replace("\\", "/")
        if tensor.dtype in (torch.int64, torch.bool) and moves_device and CACHE_DIR in caller:
            self.moves[self.step] = self.moves.get(self.step, 0) + 1
        return self._to(tensor, *args, **kwargs)

    def __enter__(self):
        register_listener(self.model, self)
        spy = self._spy
        torch.Tensor.to = lambda tensor, *args, **kwargs: spy(tensor, *args, **kwargs)
        return self

    def __exit__(self, *exc) -> None:
        torch.Tensor.to = self._to
        unregister_listener(self.model, self)


def _run(model, controller, predraw: bool):
    selector = controller.selector
    selector.predraw = predraw
    picked = []
    select = selector.select

    def recording(sample_, index, x, T, S, step=None):
        idx, pad = select(sample_, index, x, T, S, step)
        picked.append((sample_.step if step is None else step, index, x.shape[0], T * S, idx.clone()))
        return idx, pad

    selector.select = recording
    try:
        with IndexMoveSpy(model) as spy:
            out = sample(model, steps=STEPS, seed=3)
    finally:
        del selector.select
    return out, spy.moves, picked


@pytest.mark.parametrize("method", ["duca", "toca"])
def test_cached_loop_moves_no_indices_per_step_and_matches_the_per_step_draw(method):
    model = tiny_model()
    controller = cache.enable(model, method, selector="random")
    out, moves, picked = _run(model, controller, predraw=True)
    assert picked, "the schedule recomputes tokens: the test must see selections"
    # One copy at the sample's first forward (step 0), none in any later step.
    assert moves == {0: 1}, moves

    # The pre-drawn choice is the per-(video seed, step, block) draw of `selection`, CFG halves sharing it.
    k_ratio = controller.config.recompute_ratio
    for step, index, rows, n, idx in picked:
        scores = sel.random_scores(rows, n, True, controller.seeds, step, index)
        torch.testing.assert_close(idx, sel.top_k(scores, round(k_ratio * n)), atol=0, rtol=0)

    # The behaviour before pre-drawing (draw at each step) gives the same video, and did move indices per step.
    reference, old_moves, old_picked = _run(model, controller, predraw=False)
    torch.testing.assert_close(out, reference, atol=0, rtol=0)
    assert len(old_picked) == len(picked)
    assert sum(v for k, v in old_moves.items() if k not in ("start", 0)) > 0, old_moves


def test_random_frame_selector_is_predrawn_too():
    model = tiny_model()
    controller = cache.enable(model, "duca", selector="random_frame")
    out, moves, picked = _run(model, controller, predraw=True)
    assert moves == {0: 1} and picked
    reference, _, _ = _run(model, controller, predraw=False)
    torch.testing.assert_close(out, reference, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the sync check only exists on a GPU")
def test_cached_30_step_loop_has_no_sync_on_gpu():
    model = tiny_model().cuda()
    cache.enable(model, "duca")
    b, g = 2, torch.Generator().manual_seed(0)
    mask = torch.zeros(b, 8, dtype=torch.long)
    mask[0, :5], mask[1, :8] = 1, 1
    y, z = torch.randn(b, 1, 8, 32, generator=g).cuda(), torch.randn(b, 4, 3, 8, 10, generator=g).cuda()
    y_null = model.y_embedder.y_embedding[None, None].expand(b, 1, 8, 32)
    from duca_video.sampling.rflow import RFlowSampler

    sampler = RFlowSampler(num_sampling_steps=30, use_timestep_transform=False, cfg_scale=4.0)
    kwargs = dict(
        fps=torch.full((b,), 24.0, device="cuda"), height=torch.full((b,), 64.0), width=torch.full((b,), 80.0)
    )
    # The caption mask stays on the CPU, as the pipeline passes it: the sampler reads it once per sample (to cut
    # the text keys) at no device cost; a CUDA mask would make that one read a sync.
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler.sample(model, z, y, y_null, mask, model_kwargs=kwargs, progress=False, seed=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()
