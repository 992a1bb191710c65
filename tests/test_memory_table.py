"""The memory table's counts (duca_video.metrics.memory) against direct counts on a small size."""

import pytest
import torch

from duca_video.metrics import memory
from duca_video.metrics.benchmark import BenchSetup, make_inputs, run_method
from duca_video.models import STDiT3, STDiT3Config

CFG = STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8)


def small_setup(steps=8):
    return BenchSetup(
        model=CFG,
        latent_shape=(3, 6, 10),
        image_size=(48, 80),
        num_frames=9,
        num_steps=steps,
        cfg_scale=4.0,
        use_timestep_transform=False,
    )


def test_live_bytes_tracker_on_a_hand_counted_sequence():
    tracker = memory.LiveBytes()
    with tracker:
        a = torch.empty(1000, device="meta")  # 4000 B
        b = a * 2  # 8000 live
        del a  # 4000
        view = b.view(10, 100)  # a view: no new bytes
        b.add_(1)  # in place: no new bytes
        c = view + 1  # 8000
        d = torch.empty(500, device="meta", dtype=torch.bfloat16)  # 9000: the peak
        del b, view, c, d
        e = torch.empty(10, device="meta")  # after the frees: 40
    assert tracker.peak == 9000 and tracker.current == 40
    assert e.numel() == 10


@pytest.mark.parametrize("method", ["duca", "fora", "pab"])
def test_cache_bytes_on_meta_equal_a_real_cpu_run(method):
    setup = small_setup()
    counted = memory.loop_memory(setup, method)
    torch.manual_seed(0)
    model = STDiT3(CFG).eval().to(torch.bfloat16)
    real = run_method(model, setup, method, make_inputs(setup, "cpu", torch.bfloat16))
    assert counted["cache"] == real.cache_bytes > 0
    assert counted["weights"] == sum(t.numel() * 2 for t in (*model.parameters(), *model.buffers()))
    # the loop holds the cache on top of its activations; one block's worth is a share of the whole cache
    assert counted["loop_peak"] >= counted["loop_peak_without_cache"] + counted["cache_block_max"]
    assert 0 < counted["cache_block_max"] < counted["cache"]


def test_uncached_activation_peak_is_a_few_token_tensors_not_an_attention_map():
    setup = small_setup(steps=2)
    counted = memory.loop_memory(setup, "none")
    rows, tokens, c = 2, 3 * 3 * 5, CFG.hidden_size
    one = rows * tokens * c * 2  # one (rows, T*S, C) bf16 activation
    assert counted["cache"] == 0 and counted["loop_peak"] == counted["loop_peak_without_cache"]
    assert 2 * one < counted["loop_peak"] < 40 * one


def test_rows_and_markdown_at_a_real_size_with_a_small_model():
    rows = memory.memory_rows(["480p:51"], ["none", "fora"], steps=6, config=CFG, with_vae=False)
    none, fora = rows
    assert none["t5"] == fora["t5"] == pytest.approx(19.05e9, rel=0.01)  # T5-XXL encoder in fp32
    assert none["peak_t5_resident"] - none["peak_t5_freed"] == none["t5"]
    assert fora["cache"] > 0 and fora["peak_t5_freed"] > none["peak_t5_freed"]
    assert fora["offloaded_bound"] < fora["peak_t5_freed"]  # two blocks of cache instead of all of them
    table = memory.markdown(rows)
    assert table.count("\n") == 3 and "| 480p 2 s (51 fr) | fora |" in table
