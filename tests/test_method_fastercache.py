"""FasterCache: attention extrapolation and CFG-Cache on the tiny model (batch 2, CFG on), its FLOPs, the CLI,
and sequence parallelism on 2 gloo ranks."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from duca_video import cache
from duca_video.cache.methods.fastercache import FasterCachePolicy
from tests.helpers import sample, tiny_model
from tests.torchrun import run_workers

ROOT = Path(__file__).resolve().parents[1]
# Short schedules for 12-step loops: attention extrapolated at 3, 5, 7, ...; cond-only from step 4 except 5, 8, 11.
SHORT = dict(attn_start=3, cfg_start=4, cfg_interval=3, low_boost_until=6, high_boost_from=7)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_all_switches_off_equals_none_bitwise():
    model = tiny_model()
    reference = sample(model, steps=12)
    controller = cache.enable(model, "fastercache", attention=False, cfg_cache=False, **SHORT)
    torch.testing.assert_close(sample(model, steps=12), reference, atol=0, rtol=0)
    assert controller.cache_bytes == 0


def test_default_schedule_is_the_authors_open_sora_one():
    policy = cache.make_config("fastercache").make_policy(cache.Sample(tuple(range(30, 0, -1)), True, 4, (0, 0)))
    kinds = [p.kind for p in policy.plan()]
    assert [s for s, k in enumerate(kinds) if k == "conservative"] == [7, 9, 11, 13, 15, 17, 21, 23, 25, 27]
    # 19 and 29 run both CFG halves: their sources (18, 16 / 28, 26) ran the conditional rows only.
    assert [s for s, c in enumerate(policy.cond_only) if not c] == [*range(11), 14, 19, 24, 29]
    assert policy.attn_weight(7) == pytest.approx(0.9 / 20) and policy.attn_weight(27) == pytest.approx(0.9 * 21 / 20)


def _spatial_attention_outputs(model, controller):
    """Block 0's self-attention output per step (B, T*S, C), recorded where it really runs."""
    seen: dict[int, torch.Tensor] = {}
    block = cache.find_blocks(model)[0]
    block.attn.register_forward_hook(
        lambda _m, _i, out: seen.__setitem__(controller.step, out.reshape(controller.sample.rows, -1, out.shape[-1]))
    )
    return seen


def test_attention_extrapolation_from_the_last_two_computed_steps(monkeypatch):
    model = tiny_model()
    controller = cache.enable(model, "fastercache", cfg_cache=False, **SHORT)
    computed = _spatial_attention_outputs(model, controller)
    used: dict[int, torch.Tensor] = {}
    real = FasterCachePolicy.approximate

    def spy(self, index, module):
        out = real(self, index, module)
        if index == 0:
            used[self.sample.step] = out
        return out

    monkeypatch.setattr(FasterCachePolicy, "approximate", spy)
    out = sample(model, steps=12, lengths=(5, 8))
    assert torch.isfinite(out).all()
    assert sorted(used) == [3, 5, 7, 9, 11] and not set(used) & set(computed)  # attention not run there
    for step, (last, prev) in {3: (2, 1), 5: (4, 2), 9: (8, 6)}.items():
        weight = 0.9 * (step - 3 + 1) / 20
        expected = computed[last] + weight * (computed[last] - computed[prev])
        torch.testing.assert_close(used[step], expected, atol=1e-6, rtol=1e-6)
    assert [h["spatial"] for h in controller.history][:6] == ["CCC", "CCC", "CCC", "RCC", "CCC", "RCC"]


def _bands_numpy(delta: np.ndarray, divisor: int) -> np.ndarray:
    """The authors' split, written independently: centred spectrum, disc of radius min(H, W) // divisor."""
    h, w = delta.shape[-2:]
    spec = np.fft.fftshift(np.fft.fft2(delta), axes=(-2, -1))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    disc = (xx - w // 2) ** 2 + (yy - h // 2) ** 2 <= (min(h, w) // divisor) ** 2
    return np.fft.ifft2(np.fft.ifftshift(spec * disc, axes=(-2, -1))).real


def test_cfg_cache_runs_the_conditional_rows_and_rebuilds_the_unconditional_half():
    model = tiny_model()
    plain = sample(model, steps=12, h=16, w=20)
    controller = cache.enable(model, "fastercache", attention=False, **SHORT)
    rows, outputs = [], []
    model.x_embedder.register_forward_hook(lambda _m, inp, _o: rows.append(inp[0].shape[0]))
    model.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    out = sample(model, steps=12, h=16, w=20)  # 16x20 latents: low band radius 16 // 5 = 3
    assert rows == [4, 4, 4, 4, 2, 4, 2, 2, 4, 2, 2, 4]  # the model ran 2 of the 4 CFG rows on cached steps
    assert [h["model_rows"] for h in controller.history] == rows
    assert all(o.shape == outputs[0].shape == (4, 8, 3, 16, 20) for o in outputs) and out.shape == (2, 4, 3, 16, 20)
    # step -> (the full step whose difference it reads, low weight, high weight): each cached step multiplies the
    # low weight while s <= 6 and the high one while s >= 7; a refreshed difference resets both.
    expected = {4: (3, 1.15, 1.0), 6: (5, 1.15, 1.0), 7: (5, 1.15, 1.15), 9: (8, 1.0, 1.15), 10: (8, 1.0, 1.15**2)}
    for step, (full, w_low, w_high) in expected.items():
        delta = (outputs[full][2:] - outputs[full][:2]).double().numpy()
        low = _bands_numpy(delta, 5)
        rebuilt = (outputs[step][2:] - outputs[step][:2]).double().numpy()
        np.testing.assert_allclose(rebuilt, w_low * low + w_high * (delta - low), atol=1e-4)
    # The uncached loop agrees closely (a random model, 12 steps), though not exactly.
    assert 0 < (out - plain).abs().mean() < 0.1 * plain.abs().mean()


def test_flops_replay_equals_the_real_loop_and_cached_steps_cost_less():
    from duca_video.metrics.flops import stdit3_forward_flops
    from tests.helpers import real_and_replayed

    none = 8 * stdit3_forward_flops(tiny_model().config, (3, 8, 10), (64, 80), batch=4)  # 8 uncached CFG steps
    real, replayed, _ = real_and_replayed("fastercache", steps=8, **SHORT)
    assert replayed == real
    # Steps 4, 6, 7 of 8 run 2 of 4 rows: the loop costs about (8 - 3 / 2) / 8 of none, less the extrapolated
    # attention of steps 3, 5, 7.
    assert real < none * (8 - 1.5) / 8


def test_cli_runs_fastercache_close_to_none(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "scripts" / "inference.py"), run_name="inference_cli")["main"]
    prompts = [
        "a large red square moving left on a dark background",
        "a small blue circle moving up on a light background",
    ]
    latents = {}
    for method in ("none", "fastercache"):
        out = tmp_path / method
        opts = [a for k, v in SHORT.items() for a in ("--cache-opt", f"{k}={v}")] if method != "none" else []
        argv = [
            "--config",
            str(ROOT / "configs" / "tiny.py"),
            "--prompt",
            *prompts,
            "--batch-size",
            "2",
            "--num-sampling-steps",
            "8",
            "--save-latents",
            "--save-dir",
            str(out),
            "--quiet",
            "--cache",
            method,
            "--no-count-flops",
            *opts,
        ]
        assert main(argv) == 0, capsys.readouterr().err
        record = json.loads((out / "sample_0001.json").read_text())
        assert record["method"] == method and record["batch_size"] == 2
        from safetensors.torch import load_file

        latents[method] = [load_file(out / f"sample_000{i}.latent.safetensors")["latent"] for i in (0, 1)]
    assert record["method_config"]["cfg_start"] == 4 and record["cache_bytes"] > 0
    for cached, plain in zip(latents["fastercache"], latents["none"]):
        mse = (cached.clamp(-1, 1) - plain.clamp(-1, 1)).pow(2).mean().item()
        assert 0 < mse and 10 * np.log10(4 / mse) > 25  # PSNR (dB) of the trained testbed model's output


@pytest.mark.multiprocess
def test_sequence_parallel_on_2_ranks_equals_one_process(tmp_path):
    pytest.importorskip("colossalai")
    reports = run_workers("fastercache_worker.py", 2, tmp_path)
    for report in reports:
        for mode, result in report["modes"].items():
            assert result["max_diff"] <= 1e-5, (mode, result["max_diff"])
            assert result["history"] == result["single_history"], mode
            assert "conservative" in {h[0] for h in result["history"]} and 2 in {h[1] for h in result["history"]}
    # Sharded outputs: the CFG difference is summed once per full step that stores it (steps 3, 5 and 8 of 10).
    assert reports[0]["modes"]["sharded"]["delta_reduces"] == 3
    assert reports[0]["modes"]["gathered"]["delta_reduces"] == 0
