import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from duca_video.models import STDiT3, STDiT3Config
from tests.helpers import TINY, tiny_inputs, tiny_model


@pytest.mark.parametrize("case", ["plain", "odd_size_masked"])
def test_matches_upstream_reference(reference, case):
    meta = json.loads((reference / "stdit3_reference_public.json").read_text())[case]
    data = load_file(str(reference / f"stdit3_{case}.safetensors"))
    model = STDiT3(STDiT3Config.from_dict(meta["config"])).eval()
    model.load_state_dict({k[6:]: v for k, v in data.items() if k.startswith("model.")}, strict=True)
    inputs = {k[6:]: v for k, v in data.items() if k.startswith("input.")}
    with torch.no_grad():
        out = model(**inputs)
    assert out.dtype == torch.float32 and out.shape == data["output"].shape
    torch.testing.assert_close(out, data["output"], atol=1e-5, rtol=0)


def test_xl2_state_dict_loads_strictly_on_meta(reference):
    spec = json.loads((reference / "stdit3_xl2_state_dict.json").read_text())
    shapes = spec["state_dict_shapes"]
    with torch.device("meta"):
        model = STDiT3(STDiT3Config())
        state = {k: torch.empty(s) for k, s in shapes.items()}
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes
    assert len(ours) == spec["num_keys"] == 973
    # Upstream counts rope.freqs as a (frozen) parameter and the null caption as a buffer.
    counted = sum(v.numel() for k, v in model.state_dict().items() if k != "y_embedder.y_embedding")
    assert counted == spec["num_parameters"]
    model.load_state_dict(state, strict=True, assign=True)


def test_config_defaults_are_xl2():
    cfg = STDiT3Config()
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (28, 1152, 16, (1, 2, 2))
    assert cfg.out_channels == 8 and cfg.model_max_length == 300 and cfg.caption_channels == 4096


def test_hf_config_keys_are_accepted():
    hf = {
        **TINY,
        "architectures": ["STDiT3"],
        "model_type": "STDiT3",
        "enable_flash_attn": True,
        "input_size": [None, None, None],
        "class_dropout_prob": 0.1,
        "torch_dtype": "float32",
    }
    assert STDiT3Config.from_dict(hf).hidden_size == 64


def test_padding_text_tokens_do_not_matter_and_samples_do_not_mix():
    model = tiny_model()
    inputs = tiny_inputs()
    with torch.no_grad():
        out = model(**inputs)
        # Garbage in the padded text positions of sample 0 (valid length 5) changes nothing.
        garbage = dict(inputs, y=inputs["y"].clone())
        garbage["y"][0, :, 5:] = 100.0
        torch.testing.assert_close(model(**garbage), out, atol=1e-6, rtol=0)
        # Each sample alone gives the same result as in the batch (cross-attention keeps them apart).
        for i in range(2):
            alone = {k: v[i : i + 1] for k, v in inputs.items()}
            torch.testing.assert_close(model(**alone), out[i : i + 1], atol=1e-4, rtol=1e-4)


def test_mask_with_smaller_batch_is_repeated_like_upstream():
    model = tiny_model()
    inputs = tiny_inputs(lengths=(5, 5))
    with torch.no_grad():
        full = model(**inputs)
        short = model(**dict(inputs, mask=inputs["mask"][:1]))
    torch.testing.assert_close(short, full)


def test_frame_mask_changes_only_through_t0():
    model = tiny_model()
    inputs = tiny_inputs()
    all_noisy = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        plain = model(**inputs)
        masked_all_true = model(**inputs, x_mask=all_noisy)
        first_clean = model(**inputs, x_mask=torch.tensor([[False, True, True]] * 2))
    torch.testing.assert_close(masked_all_true, plain, atol=1e-6, rtol=0)
    assert not torch.allclose(first_clean, plain)


def test_bf16_runs_and_stays_close_to_fp32():
    model = tiny_model()
    inputs = tiny_inputs()
    with torch.no_grad():
        ref = model(**inputs)
        out = model.to(torch.bfloat16)(**inputs)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.ops.append((str(func), tuple(o.shape)))
        return out


def test_no_attention_map_is_materialised():
    # S = 5*6 = 30 tokens per frame, T = 7 frames, L = 8 text tokens: an attention map would end in
    # (30, 30) for spatial, (7, 7) for temporal or (210, 6) for cross-attention (keys cut to the caption's 6).
    model = tiny_model()
    inputs = tiny_inputs(b=1, t=7, h=10, w=12, lengths=(6,))
    inputs["timestep"] = inputs["timestep"][:1]
    recorder = _ShapeRecorder()
    with torch.no_grad(), recorder:
        model(**inputs)
    maps = [(op, s) for op, s in recorder.ops if len(s) >= 2 and s[-2:] in {(30, 30), (7, 7), (210, 6)}]
    assert not maps, maps
    assert any("scaled_dot_product" in op for op, _ in recorder.ops)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.update(x=i["x"][:, :3]), "x must be"),
        (lambda i: i.update(x=i["x"][0]), "x must be"),
        (lambda i: i.update(y=torch.randn(2, 1, 9, 32), mask=None), "longer than model_max_length"),
        (lambda i: i.update(y=torch.randn(2, 1, 8, 16)), "y must be"),
        (lambda i: i.update(timestep=torch.tensor([1.0])), "timestep must be"),
        (lambda i: i.update(mask=torch.zeros(2, 8, dtype=torch.long)), "at least one valid token"),
        (lambda i: i.update(x_mask=torch.ones(2, 4, dtype=torch.bool)), "x_mask must be"),
    ],
)
def test_bad_inputs_are_clear_errors(change, message):
    model = tiny_model()
    inputs = tiny_inputs()
    change(inputs)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_heads=5), "does not divide hidden_size"),
        (dict(patch_size=(1, 2)), "patch_size"),
        (dict(depth=0), "depth"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        STDiT3Config(**{**TINY, **overrides})


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="hiden_size"):
        STDiT3Config.from_dict({**TINY, "hiden_size": 64})
    with pytest.raises(ValueError, match="hiden_size"):
        STDiT3(hiden_size=64)


def test_per_prompt_size_inputs_with_cfg_doubled_batch():
    # Samplers pass fps/height/width per prompt (B) while the model sees [cond, null] (2B), as upstream does.
    model = tiny_model()
    inputs = tiny_inputs()
    with torch.no_grad():
        full = model(**inputs)
        halved = model(**dict(inputs, fps=inputs["fps"][:1], height=inputs["height"][:1], width=inputs["width"][:1]))
    torch.testing.assert_close(halved, full)
