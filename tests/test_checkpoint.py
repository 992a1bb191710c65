import json
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from duca_video.models import CheckpointMismatchError, STDiT3, STDiT3Config, load_checkpoint
from duca_video.models.checkpoint import CheckpointError, check_checkpoint
from duca_video.models.int8_rows import MIN_NUMEL, SCALE_SUFFIX, dequantize_rows, quantize_rows
from tests.helpers import TINY, tiny_inputs, tiny_model


def _out(model):
    with torch.no_grad():
        return model(**tiny_inputs())


@pytest.fixture
def trained():
    return tiny_model(seed=3)


def test_safetensors_file_roundtrip(tmp_path, trained):
    path = tmp_path / "w.safetensors"
    save_file(trained.state_dict(), str(path))
    loaded = STDiT3.from_pretrained(str(path), config=STDiT3Config(**TINY))
    torch.testing.assert_close(_out(loaded), _out(trained), atol=0, rtol=0)


def test_hf_directory_with_config(tmp_path, trained):
    (tmp_path / "config.json").write_text(
        json.dumps({**STDiT3Config(**TINY).to_dict(), "architectures": ["STDiT3"], "model_type": "STDiT3"})
    )
    save_file(trained.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = STDiT3.from_pretrained(str(tmp_path))
    assert loaded.config.hidden_size == 64
    torch.testing.assert_close(_out(loaded), _out(trained), atol=0, rtol=0)


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_torch_file_and_wrappers(tmp_path, trained, suffix):
    path = tmp_path / f"ema{suffix}"
    torch.save({"model": {f"module.{k}": v for k, v in trained.state_dict().items()}}, path)
    model = STDiT3(STDiT3Config(**TINY))
    load_checkpoint(model, path)
    torch.testing.assert_close(_out(model.eval()), _out(trained), atol=0, rtol=0)


def test_dtype_and_device_options(tmp_path, trained):
    path = tmp_path / "w.safetensors"
    save_file(trained.state_dict(), str(path))
    loaded = STDiT3.from_pretrained(str(path), config=STDiT3Config(**TINY), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in loaded.parameters())


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(STDiT3(STDiT3Config(**TINY)), path)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        STDiT3.from_pretrained(str(tmp_path / "nope.safetensors"), config=STDiT3Config(**TINY))
    with pytest.raises(FileNotFoundError, match="no weights in directory"):
        STDiT3.from_pretrained(str(tmp_path), config=STDiT3Config(**TINY))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(b"0")
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        load_checkpoint(STDiT3(STDiT3Config(**TINY)), path)


def test_mismatch_lists_missing_unexpected_and_misshaped(tmp_path, trained):
    state = dict(trained.state_dict())
    state.pop("t_block.1.bias")
    state["extra.weight"] = torch.zeros(3)
    state["final_layer.linear.weight"] = torch.zeros(5, 64)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(STDiT3(STDiT3Config(**TINY)), path)
    text = str(err.value)
    assert "missing (1)" in text and "t_block.1.bias" in text
    assert "unexpected (1)" in text and "extra.weight" in text
    assert "mis-shaped (1)" in text and "final_layer.linear.weight: checkpoint (5, 64)" in text


def test_checkpoint_of_another_architecture(tmp_path):
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(CheckpointMismatchError, match="another architecture"):
        load_checkpoint(STDiT3(STDiT3Config(**TINY)), path)


# -- unreadable files: a CheckpointError naming the file, from the headers alone where possible ---------------
def _saved(tmp_path, trained, cut=None):
    path = tmp_path / "w.safetensors"
    save_file(trained.state_dict(), str(path))
    if cut is not None:
        path.write_bytes(path.read_bytes()[:cut])
    return path


@pytest.mark.parametrize("cut", [-1, 100, 8, 0])
def test_truncated_safetensors(tmp_path, trained, cut):
    path = _saved(tmp_path, trained, cut)
    for read in (check_checkpoint, lambda p: load_checkpoint(STDiT3(STDiT3Config(**TINY)), p)):
        with pytest.raises(CheckpointError, match=f"{path} cannot be read as safetensors weights .truncated"):
            read(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_torch_file(tmp_path, trained, legacy):
    path = tmp_path / "w.pt"
    torch.save(trained.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if not legacy:  # a zip archive without its directory is refused up front
        with pytest.raises(CheckpointError, match=f"{path} is not a torch checkpoint: neither a whole zip"):
            check_checkpoint(path)
    with pytest.raises(CheckpointError, match=f"{path} cannot be read as pt weights"):
        load_checkpoint(STDiT3(STDiT3Config(**TINY)), path)


@pytest.mark.parametrize(
    "text, message",
    [
        (b'{"depth": 2,', "is not valid JSON (truncated?): line 1 column 13"),
        (b"[1, 2]", "holds a JSON list, expected an object of config keys"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
    ],
)
def test_corrupt_config_json_is_named(tmp_path, trained, text, message):
    save_file(trained.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes(text)
    for path in (tmp_path, tmp_path / "model.safetensors"):
        with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'config.json'} {message}")):
            STDiT3.from_pretrained(str(path))
        with pytest.raises(CheckpointError, match="config.json"):
            check_checkpoint(path)


def test_weights_file_uses_the_config_json_beside_it(tmp_path, trained):
    (tmp_path / "config.json").write_text(json.dumps(STDiT3Config(**TINY).to_dict()))
    save_file(trained.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = STDiT3.from_pretrained(str(tmp_path / "model.safetensors"))  # no config given: the folder's
    assert loaded.config == STDiT3Config(**TINY)
    torch.testing.assert_close(_out(loaded), _out(trained), atol=0, rtol=0)


def test_corrupt_shard_index(tmp_path, trained):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: expected a 'weight_map' object"):
        STDiT3.from_pretrained(str(tmp_path), config=STDiT3Config(**TINY))


def test_int8_rows_load_as_the_float_model_they_round_to(tmp_path, trained):
    # The stored file is ~4x smaller; loading gives back exactly q * scale, the same on every machine.
    state = trained.state_dict()
    stored = quantize_rows(state)
    big = [k for k, v in state.items() if v.ndim >= 2 and v.numel() >= MIN_NUMEL]
    assert big and all(stored[k].dtype == torch.int8 for k in big)
    assert all(torch.equal(stored[k], v) for k, v in state.items() if k not in big)  # norms, biases, tables
    restored = dequantize_rows(stored)
    for k in big:
        scale = stored[k + SCALE_SUFFIX].reshape(-1, *[1] * (state[k].ndim - 1))
        assert (restored[k] - state[k]).abs().le(scale / 2 + 1e-12).all()  # round to nearest
    save_file(stored, str(tmp_path / "q.safetensors"))
    loaded = STDiT3.from_pretrained(str(tmp_path / "q.safetensors"), config=STDiT3Config(**TINY))
    reference = STDiT3(STDiT3Config(**TINY))
    reference.load_state_dict(restored)
    torch.testing.assert_close(_out(loaded), _out(reference), atol=0, rtol=0)
    # and close to the float32 model it came from (random weights: outputs of size ~10, rounding of ~0.4%)
    assert (_out(loaded) - _out(trained)).abs().max() < 0.03 * _out(trained).abs().max()
    assert (tmp_path / "q.safetensors").stat().st_size < 0.4 * sum(v.numel() * 4 for v in state.values())


def test_int8_rows_with_a_broken_scale_are_refused_naming_the_key(tmp_path, trained):
    stored = quantize_rows(trained.state_dict())
    key = next(k for k in stored if k.endswith(SCALE_SUFFIX))
    save_file({**stored, key: stored[key][:-1].clone()}, str(tmp_path / "short.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(key)):
        STDiT3.from_pretrained(str(tmp_path / "short.safetensors"), config=STDiT3Config(**TINY))
    orphan = {k: v for k, v in stored.items() if k != key[: -len(SCALE_SUFFIX)]}
    save_file(orphan, str(tmp_path / "orphan.safetensors"))
    with pytest.raises(CheckpointError, match="has no int8 tensor"):
        STDiT3.from_pretrained(str(tmp_path / "orphan.safetensors"), config=STDiT3Config(**TINY))
