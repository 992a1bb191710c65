"""T5 from a folder laid out like DeepFloyd/t5-v1_1-xxl, alone and under sequence parallelism.

The folder is built here at tiny size with exactly the real layout: spiece.model (a SentencePiece unigram model,
pad 0 / eos 1 / unk 2 as T5's), tokenizer_config.json + special_tokens_map.json, config.json, and the weights
as two `.bin` shards + `pytorch_model.bin.index.json`; no tokenizer.json.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")

from duca_video.models.text_encoder import T5LoadError, T5TextEncoder  # noqa: E402
from tests.helpers import D_MODEL, build_deepfloyd_like_t5

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "inference.py"
cli_main = runpy.run_path(str(SCRIPT), run_name="inference_cli")["main"]
MAX_LEN = 32
SHARDS = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"]
LAYOUT = ["config.json", *SHARDS, "special_tokens_map.json", "spiece.model", "tokenizer_config.json"]
PROMPTS = ["a red circle moving left on a dark background", "waves crash on a sandy beach under a cloudy sky"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return build_deepfloyd_like_t5(tmp_path_factory.mktemp("deepfloyd_t5"))


def test_deepfloyd_layout_loads_offline_with_t5_token_ids(t5_dir):
    import sentencepiece as spm

    assert sorted(p.name for p in t5_dir.iterdir()) == LAYOUT  # no tokenizer.json, no safetensors
    encoder = T5TextEncoder(t5_dir, model_max_length=MAX_LEN)
    assert encoder.output_dim == D_MODEL
    sp = spm.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    tokens = encoder.tokenizer(PROMPTS, max_length=MAX_LEN, padding="max_length", truncation=True)["input_ids"]
    for prompt, ids in zip(PROMPTS, tokens):
        # The original T5 tokenizer: the SentencePiece ids, </s> (1), truncated to the length, padded with 0.
        want = (sp.encode(prompt)[: MAX_LEN - 1] + [1] + [0] * MAX_LEN)[:MAX_LEN]
        assert ids == want, (prompt, ids, want)
    out = encoder.encode(PROMPTS)
    assert out["y"].shape == (2, 1, MAX_LEN, D_MODEL) and out["y"].dtype == torch.float32
    assert torch.isfinite(out["y"]).all()
    assert out["mask"].sum(1).tolist() == [min(len(sp.encode(p)) + 1, MAX_LEN) for p in PROMPTS]
    bf16 = T5TextEncoder(t5_dir, model_max_length=MAX_LEN, dtype=torch.bfloat16).encode(PROMPTS)["y"]
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), out["y"], atol=0.1, rtol=0.05)


def test_unusable_tokenizer_folders_give_clear_errors(t5_dir, tmp_path, monkeypatch):
    no_tokenizer = tmp_path / "weights_only"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((t5_dir / "config.json").read_text())
    with pytest.raises(T5LoadError, match="neither tokenizer.json nor spiece.model"):
        T5TextEncoder(no_tokenizer)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in LAYOUT:
        (broken / name).symlink_to(t5_dir / name)
    (broken / "spiece.model").unlink()
    (broken / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(T5LoadError, match="spiece.model is not a readable SentencePiece model"):
        T5TextEncoder(broken)
    monkeypatch.setitem(sys.modules, "google.protobuf", None)  # as on an install without protobuf
    with pytest.raises(T5LoadError, match="needs the protobuf package.*pip install protobuf"):
        T5TextEncoder(t5_dir)


CONFIG = """
image_size = (16, 16)
num_frames = 8
fps = 8
seed = 7
batch_size = 2
dtype = "fp32"
device = "cpu"
model = dict(type="STDiT3", depth=2, hidden_size=64, num_heads=4, patch_size=(4, 2, 2), pred_sigma=False,
             input_sq_size=64)
vae = dict(type="PixelVAE")
text_encoder = dict(type="t5", from_pretrained={t5!r}, model_max_length={length}, dtype={dtype!r})
scheduler = dict(type="rflow", use_timestep_transform=False, num_sampling_steps=5, cfg_scale=4.0)
"""


def _inference(tmp_path: Path, t5_dir: Path, dtype: str, nproc: int) -> dict[str, torch.Tensor]:
    """scripts/inference.py on 2 prompts in one batch: in this process for 1, under torch.distributed.run (SP)
    for more (one process here saves importing transformers' T5 once more)."""
    from safetensors.torch import load_file

    config = tmp_path / f"t5_{dtype}.py"
    config.write_text(CONFIG.format(t5=str(t5_dir), length=MAX_LEN, dtype=dtype))
    save = tmp_path / f"{dtype}_{nproc}"
    # DuCa's default schedule warms up for 3 steps: with 5 its cache is read on the last two.
    args = [
        "--config",
        str(config),
        "--save-dir",
        str(save),
        "--quiet",
        "--cache",
        "duca",
        "--save-latents",
        "--batch-size",
        "2",
        "--prompt",
        *PROMPTS,
    ]
    if nproc == 1:
        assert cli_main(args) == 0
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        done = subprocess.run(
            [*launcher, str(SCRIPT), *args, "--sp-size", str(nproc)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    latents = {p.name: load_file(str(p))["latent"] for p in sorted(save.glob("*.latent.safetensors"))}
    assert len(latents) == len(PROMPTS), sorted(p.name for p in save.iterdir())
    return latents


@pytest.mark.multiprocess
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cli_sequence_parallel_with_t5_equals_one_process(t5_dir, tmp_path, dtype):
    pytest.importorskip("colossalai")
    single = _inference(tmp_path, t5_dir, dtype, 1)
    sp = _inference(tmp_path, t5_dir, dtype, 2)
    assert single.keys() == sp.keys()
    for name, ref in single.items():
        diff = (sp[name] - ref).abs().max().item()
        print(f"text encoder {dtype}: {name} max |diff| SP 2 vs 1 process = {diff:.3g}")
        assert bool(torch.isfinite(sp[name]).all()), (dtype, name)
        assert diff <= 1e-5, (dtype, name, diff)
    names = sorted(single)
    assert (single[names[0]] - single[names[1]]).abs().max() > 1e-3  # the two prompts give different videos
