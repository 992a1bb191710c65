"""T5 text encoder on a tiny T5 and a word-level tokenizer built offline; null caption from the model buffer."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from duca_video.models.text_encoder import T5TextEncoder, TextEncoder, null_caption  # noqa: E402
from tests.helpers import WORD_SENTENCES, WORD_T5_MAX_LEN, WORD_T5_WIDTH, build_word_level_t5  # noqa: E402

SENTENCES = WORD_SENTENCES
D_MODEL, MAX_LEN = WORD_T5_WIDTH, WORD_T5_MAX_LEN


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return build_word_level_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def encoder(t5_dir) -> T5TextEncoder:
    return T5TextEncoder(t5_dir, model_max_length=MAX_LEN)


def test_shapes_mask_and_padding(encoder):
    out = encoder.encode(["a red circle", "a blue square moving right"])
    assert out["y"].shape == (2, 1, MAX_LEN, D_MODEL) and out["y"].dtype == torch.float32
    assert out["mask"].dtype == torch.long and out["mask"].shape == (2, MAX_LEN)
    # words + </s>, then padding
    assert out["mask"].sum(1).tolist() == [4, 6]
    assert out["mask"][0].tolist() == [1] * 4 + [0] * (MAX_LEN - 4)
    assert encoder.output_dim == encoder.hidden_size == D_MODEL and encoder.model_max_length == MAX_LEN
    assert isinstance(encoder, TextEncoder)


def test_valid_tokens_do_not_depend_on_batch_padding(encoder):
    alone = encoder.encode(["a green circle moving up"])
    both = encoder.encode(["a green circle moving up", "a red square"])
    n = int(alone["mask"].sum())
    torch.testing.assert_close(alone["y"][0, 0, :n], both["y"][0, 0, :n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoder.encode(["a red square"])["y"], both["y"][1:], rtol=1e-5, atol=1e-6)


def test_truncation_warns_or_raises(t5_dir, encoder):
    long_prompt = " ".join(["red"] * 20)  # 21 tokens with </s>
    with pytest.warns(UserWarning, match="prompt 1 has 21 tokens"):
        out = encoder.encode(["a red circle", long_prompt])
    assert out["mask"][1].tolist() == [1] * MAX_LEN
    assert out["y"].shape == (2, 1, MAX_LEN, D_MODEL)
    strict = T5TextEncoder(t5_dir, model_max_length=MAX_LEN, strict=True)
    with pytest.raises(ValueError, match="prompt 0 has 21 tokens"):
        strict.encode([long_prompt])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strict.encode(["a red circle"])  # short prompts neither warn nor raise


def test_bad_prompts(encoder):
    with pytest.raises(TypeError):
        encoder.encode("a red circle")
    with pytest.raises(ValueError):
        encoder.encode([])


def test_missing_path(tmp_path):
    missing = tmp_path / "no_such_t5"
    with pytest.raises(FileNotFoundError, match="no_such_t5"):
        T5TextEncoder(missing)


def test_dtype_option(t5_dir):
    enc = T5TextEncoder(t5_dir, model_max_length=MAX_LEN, dtype=torch.bfloat16)
    assert enc.encode(["a red circle"])["y"].dtype == torch.bfloat16


class _Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.y_embedder = torch.nn.Module()
        self.y_embedder.register_buffer("y_embedding", torch.randn(MAX_LEN, D_MODEL))


def test_null_caption_from_model_buffer(t5_dir):
    model = _Holder()
    null = null_caption(model, 3)
    assert null.shape == (3, 1, MAX_LEN, D_MODEL)
    assert torch.equal(null[2, 0], model.y_embedder.y_embedding)
    null.zero_()  # a copy: the model's buffer is untouched
    assert model.y_embedder.y_embedding.abs().sum() > 0
    wrapped = torch.nn.Module()
    wrapped.module = model
    assert torch.equal(null_caption(wrapped, 1)[0, 0], model.y_embedder.y_embedding)
    with pytest.raises(AttributeError, match="y_embedding"):
        null_caption(torch.nn.Linear(2, 2), 1)

    encoder = T5TextEncoder(t5_dir, model_max_length=MAX_LEN)
    with pytest.raises(RuntimeError):
        encoder.null(2)
    assert encoder.null(2, model).shape == (2, 1, MAX_LEN, D_MODEL)
    encoder.attach(model)
    assert torch.equal(encoder.null(1), null_caption(model, 1))
