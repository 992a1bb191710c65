"""torch.compile with the cache on (CPU inductor): the eager result, and no recompiling from step to step (the
blocks' modules see one static shape per step kind; the cache's Python stays out of the graphs)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duca_video import cache
from tests.helpers import NAMES, latent, mp4_times, record, run_tiny, sample, tiny_model

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(torch.nn.Module, "compile"), reason="needs torch >= 2.2")


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _kinds(controller) -> list[str]:
    return [h["kind"] for h in controller.history]


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("duca", {}), ("toca", {"selector": "cross_entropy"})])
def test_compiled_blocks_give_the_eager_cached_result_without_recompiling_per_step(
    one_thread, float64_default, method, extra
):
    torch._dynamo.reset()
    model = tiny_model().double()
    controller = cache.enable(model, method, **extra)
    with torch.no_grad():
        eager = sample(model, steps=9)
    eager_kinds = _kinds(controller)
    assert {"full", "conservative"} <= {k.partition(":")[0] for k in eager_kinds}

    compiled = cache.compile_blocks(model)
    assert len(compiled) == 3 * len(cache.find_blocks(model))
    with torch.no_grad():
        got = sample(model, steps=9)
    assert _kinds(controller) == eager_kinds
    # float64, but the RMS norms compute in float32 (as upstream's): inductor fuses their casts, 4e-8 of the scale
    # measured; a cache that went wrong under compile would differ at the scale itself.
    assert float((got - eager).abs().max()) <= 1e-6 * float(eager.abs().max())
    graphs = _graphs()
    assert graphs > 0  # inductor really ran
    with torch.no_grad():
        sample(model, steps=12, seed=1)  # more steps, other token draws: the same step kinds and shapes
    assert _graphs() == graphs, "a later step recompiled a block module"


def test_torch_compile_of_the_cached_model_traces_none_of_the_cache(one_thread, float64_default):
    """`torch.compile(model)` with the cache enabled: dynamo captures the embedding and output layer, the cached
    blocks are graph breaks that run the cache's Python eagerly, so the graphs are made once. (Dynamo's capture
    is what this is about: the eager backend keeps the test fast; inductor's numerics are the test above.)"""
    torch._dynamo.reset()
    model = tiny_model().double()
    controller = cache.enable(model, "duca")
    with torch.no_grad():
        eager = sample(model, steps=9)
    eager_kinds = _kinds(controller)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        got = sample(compiled, steps=9)
    assert _kinds(controller) == eager_kinds
    graphs = _graphs()
    assert graphs > 0  # dynamo captured the model around the blocks
    with torch.no_grad():
        sample(compiled, steps=12, seed=1)
    assert _graphs() == graphs, "the compiled model recompiled from one step to the next"
    # The captured graphs run eager's operations; only the position table differs in rounding (eager reads an
    # lru-cached table that an earlier test may have made in float32, dynamo computes it afresh): 1e-7 of the scale.
    assert float((got - eager).abs().max()) <= 1e-6 * float(eager.abs().max())


@pytest.mark.slow
def test_cli_compile_writes_the_eager_video_and_resumes_it(tmp_path, one_thread):
    """`--compile` on the user's path (the shipped model, DuCa, a batch of 2): the eager job's video up to
    inductor's rounding, `compile` in the record, and an eager job's videos count as complete for it."""
    torch._dynamo.reset()
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert run_tiny(eager) == 0
    assert run_tiny(compiled, "--compile") == 0
    for name in NAMES:
        a, b = latent(eager, name), latent(compiled, name)
        # float32, the user's path: inductor's rounding, 2.7e-6 of the scale measured (a wrong cache: the scale)
        assert float((b - a).abs().max()) <= 1e-4 * float(a.abs().max())
        r = record(compiled, name)
        assert r["compile"] is True and r["method"] == "duca"
    before = mp4_times(eager)
    assert run_tiny(eager, "--compile") == 0
    assert mp4_times(eager) == before


def test_enabling_the_cache_loads_no_compiler():
    # torch._dynamo costs ~70 MiB and ~1 s to import: a run that never compiles must not pay for it.
    code = (
        "import sys; from duca_video import cache; from tests.helpers import tiny_model; "
        "cache.enable(tiny_model(), 'duca'); print('torch._dynamo' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


def test_prepare_compile_keeps_a_cache_enabled_before_the_compiler_out_of_tracing(monkeypatch):
    model = tiny_model()
    with monkeypatch.context() as m:  # as in a process where nothing imported the compiler yet
        m.delitem(sys.modules, "torch._dynamo", raising=False)
        cache.enable(model, "duca")
    block = model.spatial_blocks[0]
    assert not getattr(block.forward.func, "_torchdynamo_disable", False)
    cache.prepare_compile(model)
    block = model.spatial_blocks[0]
    assert getattr(block.forward.func, "_torchdynamo_disable", False)
    cache.disable(model)
