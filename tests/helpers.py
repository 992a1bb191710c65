"""Helpers shared by the tests: tiny models and inputs, a sampling loop, a DeepFloyd-layout T5 folder, FLOP
replays. Tests import from here, never from another test module."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from duca_video import cache
from duca_video.models import STDiT3, STDiT3Config
from duca_video.sampling.rflow import RFlowSampler

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    depth=2, hidden_size=64, num_heads=4, patch_size=(1, 2, 2), in_channels=4, caption_channels=32, model_max_length=8
)


def tiny_inputs(b=2, t=3, h=8, w=10, lengths=(5, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 8, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return dict(
        x=torch.randn(b, 4, t, h, w, generator=g),
        timestep=torch.tensor([900.0, 250.0][:b]),
        y=torch.randn(b, 1, 8, 32, generator=g),
        mask=mask,
        fps=torch.full((b,), 24.0),
        height=torch.full((b,), 64.0),
        width=torch.full((b,), 80.0),
    )


def tiny_model(seed=0, **overrides) -> STDiT3:
    torch.manual_seed(seed)
    model = STDiT3(STDiT3Config(**{**TINY, **overrides})).eval()
    # The zero-initialised parts upstream are random here, so every path contributes to the output.
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


def sample(model, steps=6, seed=0, prompt_seed=0, lengths=(5, 8), frame_mask=None, t=3, h=8, w=10):
    g = torch.Generator().manual_seed(prompt_seed)
    b = len(lengths)
    mask = torch.zeros(b, 8, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    y = torch.randn(b, 1, 8, 32, generator=g)
    z = torch.randn(b, 4, t, h, w, generator=g)
    y_null = model.y_embedder.y_embedding[None, None].expand(b, 1, 8, 32)
    sampler = RFlowSampler(num_sampling_steps=steps, use_timestep_transform=False, cfg_scale=4.0)
    kwargs = dict(fps=torch.full((b,), 24.0), height=torch.full((b,), 64.0), width=torch.full((b,), 80.0))
    return sampler.sample(
        model, z, y, y_null, mask, model_kwargs=kwargs, frame_mask=frame_mask, progress=False, seed=seed
    )


# The pipeline counts FLOPs after the timed run on a meta copy; the count must equal counting the real loop.
def real_and_replayed(method: str, steps: int = 10, **overrides):
    from duca_video.metrics.flops import SamplingFlops, flop_counter
    from duca_video.sampling.rflow import RFlowSampler
    from tests.helpers import tiny_model

    model = tiny_model()
    controller = None if method == "none" else cache.enable(model, method, **overrides)
    sampler = RFlowSampler(num_sampling_steps=steps, cfg_scale=3.0, use_timestep_transform=False)
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(2, 4, 3, 8, 10, generator=g), torch.randn(2, 1, 8, 32, generator=g)
    kw = {"height": torch.full((2,), 64.0), "width": torch.full((2,), 80.0), "fps": torch.full((2,), 8.0)}
    y_null = model.y_embedder.y_embedding[None, None].expand_as(y)
    counter = flop_counter()
    with counter, torch.no_grad():
        sampler.sample(
            model, z, y, y_null, torch.ones(2, 8, dtype=torch.long), model_kwargs=kw, progress=False, seed=[1, 2]
        )
    kinds = None if controller is None else [h["kind"] for h in controller.history]
    replay = SamplingFlops(model, torch.float32, None if controller is None else controller.config, sampler)
    return counter.get_total_flops(), replay.count(2, tuple(z.shape[1:]), kw, kinds), kinds


# The DeepFloyd-layout T5 folder: width and the sentinel count of T5 v1.1's tokenizer.
D_MODEL, EXTRA_IDS = 32, 100
CORPUS = [
    "a red circle moving left on a dark background",
    "a blue square moving right on a light background",
    "a green triangle slowly moving up",
    "a yellow square quickly moving down",
    "the camera pans over a quiet city at night",
    "waves crash on a sandy beach under a cloudy sky",
    "a small cat sleeps on the sofa next to the window",
    "two dogs are running through a snowy forest",
    "a drone shot of mountains covered with green trees",
    "a chef cooks noodles in a busy kitchen",
]


def _train_spiece() -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    # T5's ids: <pad>=0, </s>=1, <unk>=2, no <s>; nmt_nfkc normalisation (the default), as the real spiece.model.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 3),
        model_writer=model,
        vocab_size=150,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def _save_sharded_bin(state: dict[str, torch.Tensor], path: Path) -> None:
    # transformers 5 saves safetensors only: write the two torch.save shards and their index as older exports do.
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: state[k].contiguous() for k in part}, path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def build_deepfloyd_like_t5(path: Path, seed: int = 0) -> Path:
    """A tiny T5 v1.1 encoder folder in DeepFloyd/t5-v1_1-xxl's layout (see the module docstring)."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel

    path.mkdir(parents=True, exist_ok=True)
    proto = _train_spiece()
    (path / "spiece.model").write_bytes(proto)
    pieces = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    special = {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special))
    config = {
        **special,
        "extra_ids": EXTRA_IDS,
        "model_max_length": 512,
        "name_or_path": "google/t5-v1_1-xxl",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    # T5 v1.1: gated-gelu feed-forward, untied embeddings; the vocabulary holds the pieces and the sentinels.
    t5 = T5Config(
        vocab_size=pieces + EXTRA_IDS,
        d_model=D_MODEL,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        d_ff=64,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(t5)
    model.config.save_pretrained(path)
    _save_sharded_bin(model.state_dict(), path)
    return path


TINY_SPATIAL = {"block_out_channels": (8, 16), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4}


TINY_TEMPORAL = {
    "filters": 8,
    "num_res_blocks": 1,
    "num_groups": 4,
    "channel_multipliers": (1, 2, 2, 4),
    "temporal_downsample": (False, True, True),
}


WORD_SENTENCES = [
    "a red circle moving left on dark background",
    "a blue square moving right on light background",
    "a green circle moving up",
    "a yellow square moving down",
]
WORD_T5_WIDTH, WORD_T5_MAX_LEN = 32, 12


def build_word_level_t5(path: Path) -> Path:
    """A tiny T5 encoder with a word-level tokenizer over WORD_SENTENCES (tokenizer.json layout), saved to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(WORD_SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    # T5 appends </s> (id 1) to every sequence; pad is id 0.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=tok.get_vocab_size(),
        d_model=WORD_T5_WIDTH,
        d_kv=8,
        num_heads=4,
        num_layers=1,
        d_ff=64,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5EncoderModel(config).save_pretrained(path)
    return path


# -- the shipped tiny model through the user's path ----------------------------------------------------------------
# The user's command (DuCa, two prompts in one batch of 2, latents saved), run in process, and what it writes.
NAMES = ("sample_0000", "sample_0001")
BASE = [
    "--config",
    str(ROOT / "configs" / "tiny.py"),
    "--prompt",
    "a large red circle moving left on a dark background",
    "a small blue square moving up on a light background",
    "--batch-size",
    "2",
    "--num-sampling-steps",
    "9",
    "--save-latents",
    "--quiet",
]


def run_tiny(save_dir: Path, *extra: str) -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    from inference import main

    return main([*BASE, "--save-dir", str(save_dir), *extra])


def latent(save_dir: Path, name: str) -> torch.Tensor:
    return load_file(str(save_dir / f"{name}.latent.safetensors"))["latent"]


def record(save_dir: Path, name: str) -> dict:
    return json.loads((save_dir / f"{name}.json").read_text())


def mp4_times(save_dir: Path) -> dict[str, int]:
    """Each video's modification time: unchanged when a later job counts it as complete."""
    return {p.name: p.stat().st_mtime_ns for p in save_dir.glob("*.mp4")}


# The pipeline's own loader and generator on the shipped model, as `scripts/inference.py --cache METHOD` builds them.
TINY_CONFIG = ROOT / "configs" / "tiny.py"
TWO_PROMPTS = [
    "a large red square moving left on a dark background",
    "a small blue circle moving up on a light background",
]
TINY_STEPS = 10


def inference_main(argv: list[str]) -> int:
    """scripts/inference.py's `main`, in this process."""
    import runpy

    return runpy.run_path(str(ROOT / "scripts" / "inference.py"), run_name="inference_cli")["main"](argv)


def load_tiny_batch(method: str, *opts: str, flops: bool = False):
    """(cfg, models, jobs) for both prompts in one batch of 2 with `--cache METHOD --cache-opt OPT...`."""
    from duca_video import pipeline
    from duca_video.configs import build_parser, load_config

    argv = [
        "--config",
        str(TINY_CONFIG),
        "--save-dir",
        "unused",
        "--quiet",
        "--prompt",
        *TWO_PROMPTS,
        "--batch-size",
        "2",
        "--num-sampling-steps",
        str(TINY_STEPS),
        "--cache",
        method,
        *(f"--cache-opt={o}" for o in opts),
        "--count-flops" if flops else "--no-count-flops",
    ]
    cfg = load_config(argv[1], build_parser().parse_args(argv))
    models = pipeline.load_models(cfg, pipeline.resolve_weights(cfg), torch.device("cpu"))
    jobs = pipeline.plan_batches(cfg, pipeline.load_prompts(cfg))[0]
    assert len(jobs) == 2
    return cfg, models, jobs


def generate_tiny_batch(method: str, *opts: str, flops: bool = False):
    """(the generated batch, the models) of `load_tiny_batch`."""
    from duca_video import pipeline

    cfg, models, jobs = load_tiny_batch(method, *opts, flops=flops)
    return pipeline.generate(models, cfg, jobs, False), models


def reference_dir() -> Path | None:
    """Numeric references made with upstream Open-Sora's code (not in the repository: $DUCA_REFERENCE_DIR names a
    folder of them, see docs/testing.md); the tests that need them skip without it."""
    value = os.environ.get("DUCA_REFERENCE_DIR")
    return Path(value) if value else None


def counted_tiny_loop(models) -> tuple[list[str], int, Any]:
    """The real sampling loop of `load_tiny_batch(..., flops=True)`'s models on both prompts, counted by the FLOP
    counter, every caption token valid (the replay on meta counts full-length captions): (the step kinds
    decided, the FLOPs counted, the replay's count function of a list of kinds)."""
    from duca_video.metrics.flops import flop_counter
    from duca_video.models.text_encoder import null_caption
    from duca_video.parallel.group_work import encode_text

    y, mask = encode_text(models.text_encoder, TWO_PROMPTS, models.ctx, models.device)
    z = torch.randn(2, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    sizes = {k: torch.full((2,), v) for k, v in (("height", 16.0), ("width", 16.0), ("num_frames", 8.0), ("fps", 8.0))}
    kwargs = {"model_kwargs": sizes, "progress": False, "seed": [1, 2]}
    with flop_counter() as counter, torch.no_grad():
        models.sampler.sample(models.model, z, y, null_caption(models.model, 2), torch.ones_like(mask), **kwargs)
    decided = [h["kind"] for h in models.controller.history]
    return decided, counter.get_total_flops(), lambda kinds: models.flops.count(2, models.latent_shape, sizes, kinds)
