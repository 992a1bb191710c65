"""T5 gives its device memory back after encoding (offload "cpu" or "free") and encodes the same afterwards."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from duca_video.models.text_encoder import T5TextEncoder  # noqa: E402
from tests.helpers import WORD_SENTENCES, WORD_T5_MAX_LEN, build_word_level_t5  # noqa: E402

PROMPTS, MAX_LEN = WORD_SENTENCES[:2], WORD_T5_MAX_LEN


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_word_level_t5(tmp_path_factory.mktemp("tiny_t5"))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert torch.equal(a["mask"].cpu(), b["mask"].cpu())
    torch.testing.assert_close(a["y"].cpu(), b["y"].cpu(), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_free_drops_the_weights_and_reloads_them_for_the_next_encoding(t5_dir, device):
    resident = T5TextEncoder(t5_dir, model_max_length=MAX_LEN, device=device)
    reference = resident.encode(PROMPTS)
    assert resident.resident == "device"  # offload "none": stays
    freed = T5TextEncoder(t5_dir, model_max_length=MAX_LEN, device=device, offload="free")
    first = freed.encode(PROMPTS)
    assert freed.model is None and freed.resident == "freed"
    _same(first, reference)
    _same(freed.encode(PROMPTS), reference)  # reloaded from the folder, freed again
    assert freed.model is None
    assert first["y"].device.type == device  # the embeddings stay where the video model needs them


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_offload_keeps_the_weights_in_host_memory_between_encodings(t5_dir, device):
    reference = T5TextEncoder(t5_dir, model_max_length=MAX_LEN, device=device).encode(PROMPTS)
    encoder = T5TextEncoder(t5_dir, model_max_length=MAX_LEN, device=device, offload="cpu")
    held = encoder.model
    assert next(held.parameters()).device.type == "cpu"  # loaded into host memory, not onto the device
    for _ in range(2):
        _same(encoder.encode(PROMPTS), reference)
        assert encoder.model is held and next(held.parameters()).device.type == "cpu"


def test_release_on_demand_then_encode_again(t5_dir):
    encoder = T5TextEncoder(t5_dir, model_max_length=MAX_LEN)
    reference = encoder.encode(PROMPTS)
    encoder.release("free")
    assert encoder.resident == "freed"
    _same(encoder.encode(PROMPTS), reference)
    assert encoder.resident == "device"  # offload "none": the reloaded weights stay
    encoder.release("cpu")
    _same(encoder.encode(PROMPTS), reference)


def test_bad_offload_mode_is_a_clear_error(t5_dir):
    with pytest.raises(ValueError, match="offload='gpu' is not allowed; allowed: none, cpu, free"):
        T5TextEncoder(t5_dir, model_max_length=MAX_LEN, offload="gpu")
    with pytest.raises(ValueError, match="release mode='all' is not allowed"):
        T5TextEncoder(t5_dir, model_max_length=MAX_LEN).release("all")
