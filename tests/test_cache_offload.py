"""The cache in host memory (`enable(..., offload=True)`): the same result as the resident cache, with about two
blocks' worth on the device at any time (the running block's and the next one's, prefetched)."""

import pytest
import torch

from duca_video import cache
from tests.test_cache import sample
from tests.test_stdit3 import tiny_model


@pytest.mark.parametrize("method, extra", [("duca", {}), ("toca", {}), ("fora", {}), ("taylorseer", {"interval": 3}),
                                           ("toca", {"selector": "random", "age_bonus": 0.5}), ("pab", {})])
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


def test_cli_cache_offload_writes_the_same_video(tmp_path):
    import json
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    from inference import main

    base = ["--config", str(root / "configs" / "tiny.py"), "--prompt", "a large red circle moving left on a dark "
            "background", "a small blue square moving up on a light background", "--batch-size", "2",
            "--num-sampling-steps", "9", "--save-latents", "--quiet"]  # fmt: skip
    assert main([*base, "--save-dir", str(tmp_path / "resident")]) == 0
    assert main([*base, "--save-dir", str(tmp_path / "offloaded"), "--cache-offload"]) == 0
    for name in ("sample_0000", "sample_0001"):
        a = load_file(str(tmp_path / "resident" / f"{name}.latent.safetensors"))["latent"]
        b = load_file(str(tmp_path / "offloaded" / f"{name}.latent.safetensors"))["latent"]
        torch.testing.assert_close(b, a, atol=0, rtol=0)
        record = json.loads((tmp_path / "offloaded" / f"{name}.json").read_text())
        assert record["cache_offload"] is True and record["cache_bytes"] > 0
    # Offloading changes no pixel: the resident job's videos count as complete for it (nothing regenerated).
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resident").glob("*.mp4")}
    assert main([*base, "--save-dir", str(tmp_path / "resident"), "--cache-offload"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resident").glob("*.mp4")} == before
