"""Tests for the Open-Sora 1.2 temporal VAE and the spatial+temporal VAE pipeline (CPU, tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from duca_video.models.checkpoint import read_state_dict
from duca_video.models.vae import (
    CausalConv3d,
    OpenSoraVAE,
    SpatialVAE,
    TemporalVAE,
    temporal_vae_sd,
)
from tests.helpers import TINY_SPATIAL, TINY_TEMPORAL, reference_dir

REFERENCE_DIR = reference_dir() or Path("$DUCA_REFERENCE_DIR (not set)")
REF_WEIGHTS = REFERENCE_DIR / "temporal_vae_public.safetensors"
REF_JSON = REFERENCE_DIR / "temporal_vae_reference_public.json"
FULL_SIZE_NUM_PARAMETERS = 309_687_144


def _need_reference() -> dict:
    if not (REF_WEIGHTS.is_file() and REF_JSON.is_file()):
        pytest.skip(f"reference data not found in {REFERENCE_DIR}")
    return json.loads(REF_JSON.read_text())


@pytest.fixture(scope="module")
def tiny_pipeline() -> OpenSoraVAE:
    torch.manual_seed(0)
    return OpenSoraVAE.from_config(TINY_SPATIAL, TINY_TEMPORAL).eval()


@pytest.fixture(scope="module")
def tiny_temporal() -> TemporalVAE:
    torch.manual_seed(0)
    return TemporalVAE(in_out_channels=4, **TINY_TEMPORAL).eval()


# ---------------------------------------------------------------------------------------------- temporal VAE


def test_temporal_vae_matches_reference() -> None:
    ref = _need_reference()
    cfg = ref["config"]
    tensors = read_state_dict(REF_WEIGHTS)
    model = TemporalVAE(
        in_out_channels=4,
        latent_embed_dim=4,
        embed_dim=4,
        filters=cfg["filters"],
        num_res_blocks=cfg["num_res_blocks"],
        num_groups=cfg["num_groups"],
        channel_multipliers=(1, 2, 2, 4),
        temporal_downsample=(False, True, True),
    ).eval()
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    x = tensors["input.x"]
    assert x.shape[2] == cfg["frames"] and list(x.shape[3:]) == cfg["hw"]
    with torch.no_grad():
        posterior = model.encode(x)
        decoded = model.decode(posterior.mean, num_frames=cfg["frames"])
    torch.testing.assert_close(posterior.mean, tensors["output.posterior_mean"], atol=1e-4, rtol=0)
    torch.testing.assert_close(posterior.logvar, tensors["output.posterior_logvar"], atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded, tensors["output.decoded"], atol=1e-4, rtol=0)


def test_full_size_state_dict_loads_strictly_on_meta() -> None:
    ref = _need_reference()
    with torch.device("meta"):
        model = temporal_vae_sd()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = ref["full_size_state_dict_shapes"]
    assert sorted(set(shapes) ^ set(expected)) == []
    assert shapes == expected
    assert ref["full_size_num_parameters"] == FULL_SIZE_NUM_PARAMETERS
    # The reference shapes must also be accepted by a strict load.
    model.load_state_dict({k: torch.empty(v, device="meta") for k, v in expected.items()}, strict=True, assign=True)


def test_full_size_parameter_count() -> None:
    with torch.device("meta"):
        model = temporal_vae_sd()
    assert sum(p.numel() for p in model.parameters()) == FULL_SIZE_NUM_PARAMETERS


@pytest.mark.parametrize(("frames", "latent_frames"), [(1, 1), (4, 1), (5, 2), (17, 5), (20, 5)])
def test_temporal_shapes_and_causal_padding(tiny_temporal: TemporalVAE, frames: int, latent_frames: int) -> None:
    x = torch.randn(1, 4, frames, 4, 4)
    assert tiny_temporal.get_latent_size((frames, 4, 4)) == (latent_frames, 4, 4)
    with torch.no_grad():
        posterior = tiny_temporal.encode(x)
        assert posterior.mean.shape == posterior.logvar.shape == (1, 4, latent_frames, 4, 4)
        sample = posterior.sample(generator=torch.Generator().manual_seed(1))
        assert sample.shape == posterior.mean.shape
        assert tiny_temporal.decode(sample, num_frames=frames).shape == x.shape


def test_causal_conv_pads_only_the_past() -> None:
    # The VAE as a whole is not causal (GroupNorm pools over time), but every convolution must be.
    torch.manual_seed(0)
    conv = CausalConv3d(2, 3, (3, 3, 3))
    strided = CausalConv3d(2, 3, (3, 3, 3), strides=(2, 1, 1))
    x = torch.randn(1, 2, 8, 4, 4)
    y = x.clone()
    y[:, :, 5:] += 1.0
    with torch.no_grad():
        a, b = conv(x), conv(y)
        assert a.shape == (1, 3, 8, 4, 4)
        torch.testing.assert_close(a[:, :, :5], b[:, :, :5])
        assert not torch.allclose(a[:, :, 5:], b[:, :, 5:])
        # Stride 2 maps 8 frames to 4; output k sees input frames 2k-1 .. 2k+1.
        c, d = strided(x), strided(y)
        assert c.shape == (1, 3, 4, 4, 4)
        torch.testing.assert_close(c[:, :, :2], d[:, :, :2])
        assert not torch.allclose(c[:, :, 2:], d[:, :, 2:])


def test_temporal_bad_inputs(tiny_temporal: TemporalVAE) -> None:
    with pytest.raises(ValueError, match=r"\(B, 4, T, H, W\)"):
        tiny_temporal.encode(torch.randn(4, 5, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 4, T, H, W\)"):
        tiny_temporal.encode(torch.randn(1, 3, 5, 4, 4))
    with pytest.raises(ValueError, match="num_frames"):
        tiny_temporal.decode(torch.randn(1, 4, 2, 4, 4), num_frames=17)


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("frames", [17, 34, 20])
def test_pipeline_round_trip_shapes(tiny_pipeline: OpenSoraVAE, frames: int) -> None:
    x = torch.rand(1, 3, frames, 16, 8) * 2 - 1
    with torch.no_grad():
        z = tiny_pipeline.encode(x, generator=torch.Generator().manual_seed(0))
        assert tuple(z.shape) == (1, 4, *tiny_pipeline.get_latent_size((frames, 16, 8)))
        out = tiny_pipeline.decode(z, num_frames=frames)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_pipeline_latent_size_arithmetic(tiny_pipeline: OpenSoraVAE) -> None:
    # Tiny spatial VAE has two resolution levels -> 2x spatial downsampling.
    assert tiny_pipeline.get_latent_size((17, 16, 8)) == (5, 8, 4)
    assert tiny_pipeline.get_latent_size((34, 16, 8)) == (10, 8, 4)
    assert tiny_pipeline.get_latent_size((18, None, None)) == (6, None, None)


def test_full_config_latent_size_without_weights() -> None:
    with torch.device("meta"):
        model = OpenSoraVAE.from_config()
    assert model.get_latent_size((51, 480, 854)) == (15, 60, 106)
    assert model.get_latent_size((1, 480, 854)) == (1, 60, 106)
    assert model.get_latent_size((None, 480, 854)) == (None, 60, 106)
    torch.testing.assert_close(model.shift.flatten(), torch.tensor([-0.10, 0.34, 0.27, 0.98]))
    torch.testing.assert_close(model.scale.flatten(), torch.tensor([3.85, 2.32, 2.33, 3.06]))


def test_pipeline_bad_inputs(tiny_pipeline: OpenSoraVAE) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        tiny_pipeline.encode(torch.randn(3, 17, 16, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        tiny_pipeline.encode(torch.randn(1, 4, 17, 16, 8))
    with pytest.raises(ValueError, match=r"\(B, 4, T, H, W\)"):
        tiny_pipeline.decode(torch.randn(1, 3, 5, 8, 4), num_frames=17)
    with pytest.raises(ValueError, match=r"\(B, 4, T, H, W\)"):
        tiny_pipeline.decode(torch.randn(4, 5, 8, 4), num_frames=17)
    with pytest.raises(ValueError, match="num_frames"):
        tiny_pipeline.decode(torch.randn(1, 4, 5, 8, 4), num_frames=34)


def test_combined_state_dict_round_trip_and_errors(tiny_pipeline: OpenSoraVAE) -> None:
    sd = tiny_pipeline.state_dict()
    assert any(k.startswith("spatial_vae.module.") for k in sd)
    assert any(k.startswith("temporal_vae.") for k in sd)
    loaded = OpenSoraVAE.from_checkpoint(sd, spatial_config=TINY_SPATIAL, temporal_config=TINY_TEMPORAL)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, sd[key]), key

    without_norm = {k: v for k, v in sd.items() if k not in ("scale", "shift")}
    OpenSoraVAE.from_checkpoint(without_norm, spatial_config=TINY_SPATIAL, temporal_config=TINY_TEMPORAL)

    bad = dict(sd)
    bad.pop("temporal_vae.quant_conv.conv.bias")
    bad["temporal_vae.extra"] = torch.zeros(1)
    bad["spatial_vae.module.encoder.conv_in.weight"] = torch.zeros(2)
    with pytest.raises(ValueError) as info:
        OpenSoraVAE.from_checkpoint(bad, spatial_config=TINY_SPATIAL, temporal_config=TINY_TEMPORAL)
    message = str(info.value)
    assert "temporal_vae.quant_conv.conv.bias" in message
    assert "temporal_vae.extra" in message
    assert "spatial_vae.module.encoder.conv_in.weight" in message


def test_from_pretrained_local_directory(tiny_pipeline: OpenSoraVAE, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tiny_pipeline.spatial_vae.module.save_pretrained(tmp_path / "pixart" / "vae")
    temporal_file = tmp_path / "temporal.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_pipeline.temporal_vae.state_dict().items()}, temporal_file)
    loaded = OpenSoraVAE.from_pretrained(tmp_path / "pixart", temporal_file, temporal_config=TINY_TEMPORAL)
    assert isinstance(loaded.spatial_vae, SpatialVAE)
    assert loaded.spatial_vae.micro_batch_size == 4
    reference = tiny_pipeline.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key

    with pytest.raises(ValueError, match="missing"):
        partial = dict(tiny_pipeline.temporal_vae.state_dict())
        partial.pop("decoder.conv_out.conv.weight")
        OpenSoraVAE.from_pretrained(tmp_path / "pixart", partial, temporal_config=TINY_TEMPORAL)
