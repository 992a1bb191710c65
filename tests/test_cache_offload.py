"""The cache in host memory (`enable(..., offload=True)`): the same result as the resident cache, with about two
blocks' worth on the device at any time (the running block's and the next one's, prefetched)."""

import pytest
import torch

from duca_video import cache
from tests.helpers import NAMES, latent, mp4_times, record, run_tiny, sample, tiny_model


@pytest.mark.parametrize(
    "method, extra",
    [
        ("duca", {}),
        ("toca", {}),
        ("fora", {}),
        ("taylorseer", {"interval": 3}),
        ("toca", {"selector": "random", "age_bonus": 0.5}),
        ("pab", {}),
        ("auto", {"schedule": "FFCRAMSTA"}),
    ],
)
def test_offloaded_cache_gives_the_resident_result_with_two_blocks_on_the_device(method, extra):
    model = tiny_model()
    resident = cache.enable(model, method, **extra)
    expected = sample(model, steps=9)
    held = resident.cache_bytes
    offloaded = cache.enable(model, method, offload=True, **extra)
    got = sample(model, steps=9)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert offloaded.cache_bytes == held > 0  # the same cache, now in host memory
    blocks = len(cache.find_blocks(model))
    # On the device: at most the running block's share and the next one's, prefetched while it runs (the stack
    # tensors stay, and are small here).
    assert 0 < offloaded.device_cache_bytes <= 2 * held / blocks + 4 * 3 * 20 * 64 * 4, (method, held)
    assert offloaded.device_cache_bytes < held
    store = offloaded.last.store
    # Every block after the first found its cache prefetched: the copy ran while the block before it computed.
    assert store.reads["prefetched"] > 0 and store.on_demand_blocks <= {0}, (store.reads, store.on_demand_blocks)


@pytest.mark.slow
def test_cli_cache_offload_writes_the_same_video(tmp_path):
    resident, offloaded = tmp_path / "resident", tmp_path / "offloaded"
    assert run_tiny(resident) == 0
    assert run_tiny(offloaded, "--cache-offload") == 0
    for name in NAMES:
        torch.testing.assert_close(latent(offloaded, name), latent(resident, name), atol=0, rtol=0)
        r = record(offloaded, name)
        assert r["cache_offload"] is True and r["cache_bytes"] > 0
    # Offloading changes no pixel: the resident job's videos count as complete for it (nothing regenerated).
    before = mp4_times(resident)
    assert run_tiny(resident, "--cache-offload") == 0
    assert mp4_times(resident) == before


def test_offloaded_store_counts_meta_tensors_without_copying_values():
    # A FLOP or memory count runs on the meta device: the store keeps shapes on a meta "host", counts the same
    # bytes and hands back meta tensors, with no special case for meta in the store's code.
    from duca_video.cache.state import OffloadedState

    store = OffloadedState()
    value = torch.empty(2, 16, 8, device="meta")
    store.enter(0)
    store.put(0, "mlp", value)
    store.release(0)
    store.prefetch(0)
    held = store.get(0, "mlp")
    assert held.is_meta and held.shape == value.shape
    assert store.peak_bytes == 2 * 16 * 8 * 4 and store.resident_peak_bytes == store.peak_bytes
    assert store.reads == {"prefetched": 1, "on_demand": 0}
