"""The synthetic testbed: data, metrics, word encoder, pixel VAE, the training script and the shipped model."""

from __future__ import annotations

import importlib.util
import json
import random
import warnings
from pathlib import Path

import pytest
import torch

from duca_video.models import STDiT3, STDiT3Config
from duca_video.testbed import PixelVAE, WordTextEncoder
from duca_video.testbed.adherence import CHANCE, adherence, color_accuracy, direction_accuracy, parse_caption
from duca_video.testbed.data import DataConfig, SyntheticVideos
from duca_video.testbed.grammar import vocabulary
from duca_video.testbed.grow import RESIDUAL_OUTPUTS, grow_depth
from duca_video.testbed.tiny import DEFAULT_TINY_DIR, load_tiny, read_tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips():
    return SyntheticVideos().sample(240, seed=3)


# ---------------------------------------------------------------------------------------------- data + metrics
def test_ground_truth_scores_100_percent(clips):
    videos, captions, _ = clips
    cfg = DataConfig()
    assert videos.shape == (240, 3, cfg.num_frames, cfg.height, cfg.width)
    assert videos.min() >= -1 and videos.max() <= 1
    assert color_accuracy(videos, captions) == 1.0
    assert direction_accuracy(videos, captions) == 1.0
    scores = adherence(videos, captions)
    assert scores["background"] == scores["size"] == 1.0
    assert scores["shape"] >= 0.98  # a 3-px circle and a 3-px square can look alike
    assert scores["consistency"] > 0.8


def test_shuffled_captions_score_near_chance(clips):
    videos, captions, _ = clips
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    scores = adherence(videos, shuffled)
    assert abs(scores["colour"] - CHANCE["colour"]) < 0.1
    assert abs(scores["direction"] - CHANCE["direction"]) < 0.1


def test_data_is_seeded_and_shapes_stay_inside(clips):
    videos, captions, meta = clips
    again, captions2, _ = SyntheticVideos().sample(240, seed=3)
    assert torch.equal(videos, again) and captions == captions2
    assert not torch.equal(videos[:8], SyntheticVideos().sample(8, seed=4)[0])
    # A shape cut by the border would lose area in some frames: the covered area must be the same in all.
    bg = torch.tensor([-0.84 if c.background == "dark" else 0.84 for c in meta])[:, None, None, None]
    area = (videos - bg[:, None]).abs().sum(1).flatten(2).sum(-1)  # (B, T)
    assert torch.allclose(area, area[:, :1].expand_as(area), rtol=0.05)
    assert set(parse_caption(captions[0])) >= {"colour", "shape", "direction", "background"}


def test_caption_parsing():
    parsed = parse_caption("A large red square moving left on a dark background")
    assert parsed == {
        "colour": "red",
        "shape": "square",
        "direction": "left",
        "background": "dark",
        "size": "large",
        "speed": None,
    }
    with pytest.raises(ValueError, match="names no direction"):
        parse_caption("a red square on a dark background")
    with pytest.raises(ValueError, match="several colours"):
        parse_caption("a red blue square moving up on a dark background")


def test_data_config_rejects_tracks_that_leave_the_frame():
    with pytest.raises(ValueError, match="does not fit"):
        DataConfig(num_frames=16)
    # Starting at the centre leaves half the frame for the track: fits "anywhere", not from the centre.
    wide = {"small": (1.0, 1.2), "large": (1.5, 2.0)}
    DataConfig(num_frames=12, radius=wide, start="anywhere")
    with pytest.raises(ValueError, match="does not fit"):
        DataConfig(num_frames=12, radius=wide, start="centre")
    with pytest.raises(ValueError, match="start must be"):
        DataConfig(start="middle")
    assert DataConfig.from_dict(DataConfig().to_dict()) == DataConfig()


@pytest.mark.parametrize("start", ["centre", "anywhere"])
def test_track_starts_where_the_config_says(start):
    cfg = DataConfig(start=start, start_jitter=1.0)
    videos, captions, meta = SyntheticVideos(cfg).sample(400, seed=0)
    starts = torch.tensor([c.start for c in meta])
    offset = (starts - torch.tensor([cfg.width / 2, cfg.height / 2])).abs()
    if start == "centre":
        assert offset.max() <= 1.0 + 1e-6
    else:
        assert offset.max() > 2.0  # tracks start all over the frame
    scores = adherence(videos, captions, cfg)
    assert scores["direction"] == 1.0 and scores["colour"] == 1.0


# ---------------------------------------------------------------------------------------------- word encoder
def test_word_encoder_shapes_masks_and_unknown_words(tmp_path):
    enc = WordTextEncoder(output_dim=8, model_max_length=12).eval()
    assert enc.words == vocabulary() and enc.output_dim == 8 and enc.model_max_length == 12
    out = enc.encode(["a red square moving left on a dark background", "Blue circle!"])
    assert out["y"].shape == (2, 1, 12, 8) and out["y"].dtype == torch.float32
    assert out["mask"].dtype == torch.long and out["mask"].sum(1).tolist() == [9, 2]
    assert not out["y"].requires_grad
    assert torch.equal(out["y"][1, 0, 2:], torch.zeros(10, 8))  # <pad> is a zero vector
    with pytest.warns(UserWarning, match=r"unknown words .*\['purple', 'triangle'\]"):
        out = enc.encode(["a purple triangle"])
    assert torch.equal(out["y"][0, 0, 1], enc.embedding.weight[1])  # <unk>
    for bad in ([""], ["  !? "]):
        with pytest.raises(ValueError, match="empty caption"):
            enc.encode(bad)
    with pytest.raises(TypeError):
        enc.encode("a red square")
    with pytest.warns(UserWarning, match="limit is 12"):
        enc.encode(["a " * 13])
    enc.train()
    assert enc.encode(["red"])["y"].requires_grad  # learns jointly with the model in train mode

    enc.save_pretrained(tmp_path)
    loaded = WordTextEncoder.from_pretrained(tmp_path)
    assert loaded.words == enc.words and torch.equal(loaded.embedding.weight, enc.embedding.weight)
    assert json.loads((tmp_path / "text_encoder.json").read_text())["model_max_length"] == 12


def test_word_encoder_null_caption_is_the_models():
    enc = WordTextEncoder(output_dim=8, model_max_length=12)
    cfg = STDiT3Config(
        depth=1, hidden_size=16, num_heads=2, in_channels=3, caption_channels=8, model_max_length=12, pred_sigma=False
    )
    model = STDiT3(cfg)
    with pytest.raises(RuntimeError, match="needs a model"):
        enc.null(2)
    null = enc.attach(model).null(3)
    assert null.shape == (3, 1, 12, 8) and torch.equal(null[2, 0], model.y_embedder.y_embedding)


# ---------------------------------------------------------------------------------------------- pixel VAE
def test_pixel_vae_round_trip():
    vae = PixelVAE()
    x = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    assert vae.in_channels == vae.out_channels == 3 and vae.dtype == torch.float32 and vae.device.type == "cpu"
    assert vae.get_latent_size((5, 8, 8)) == (5, 8, 8) and vae.get_latent_size((None, 8, 8)) == (None, 8, 8)
    assert torch.equal(vae.decode(vae.encode(x), num_frames=5), x)
    assert vae.decode(torch.full((1, 3, 2, 4, 4), 3.0)).max() == 1.0
    assert vae.to(torch.float64).encode(x).dtype == torch.float64
    with pytest.raises(ValueError):
        vae.encode(torch.zeros(1, 4, 2, 4, 4))
    with pytest.raises(ValueError, match="num_frames"):
        vae.decode(x, num_frames=4)


# ---------------------------------------------------------------------------------------------- training script
def _train_module():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "scripts" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_script_resume_matches_an_uninterrupted_run(tmp_path):
    train = _train_module()
    common = [
        "--depth",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--batch-size",
        "2",
        "--no-bf16",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--log-every",
        "1",
        "--text-dim",
        "8",
    ]
    train.main([*common, "--out", str(tmp_path / "a"), "--steps", "3"])
    train.main([*common, "--out", str(tmp_path / "b"), "--steps", "3", "--stop-at", "2"])
    train.main([*common, "--out", str(tmp_path / "b"), "--steps", "3", "--resume"])
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "b" / "run" / "loss.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and len(log) == 4
    bed = load_tiny(tmp_path / "a")
    video = bed.generate(["a red circle moving up on a light background"], seeds=[0])
    assert video.shape == (1, 3, bed.data.num_frames, bed.data.height, bed.data.width)

    # A deeper model started from this one (--grow-from) and distilled from it (--teacher): config.json says so;
    # another width is refused by name.
    deeper = [
        *common[2:],
        "--depth",
        "2",
        "--steps",
        "1",
        "--grow-from",
        str(tmp_path / "a"),
        "--teacher",
        str(tmp_path / "a"),
    ]
    train.main([*deeper, "--out", str(tmp_path / "c"), "--store", "int8"])
    grown = json.loads((tmp_path / "c" / "config.json").read_text())
    training = grown["testbed"]["training"]
    assert grown["depth"] == 2 and training["grown_from"]["depth"] == 1 and training["teacher"] == str(tmp_path / "a")
    # stored as int8 rows (the MLP matrices here), loaded back as float32 by the usual loader
    stored = load_file(tmp_path / "c" / "model.safetensors")
    assert training["storage"].startswith("int8") and stored["spatial_blocks.0.mlp.fc1.weight"].dtype == torch.int8
    assert load_tiny(tmp_path / "c").model.spatial_blocks[0].mlp.fc1.weight.dtype == torch.float32
    with pytest.raises(SystemExit, match="--teacher .*nowhere: no config.json or model.safetensors"):
        train.main([*deeper[:-1], str(tmp_path / "nowhere"), "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match="hidden_size is 32 there, 16 here"):
        train.main([*deeper, "--hidden", "16", "--out", str(tmp_path / "d")])


def _tiny_stdit3(depth: int) -> STDiT3:
    sizes = dict(hidden_size=32, num_heads=2, caption_channels=8, model_max_length=4, input_sq_size=16)
    config = STDiT3Config(depth=depth, patch_size=(4, 2, 2), in_channels=3, pred_sigma=False, **sizes)
    return STDiT3(config).eval()


def test_grown_model_repeats_blocks_and_divides_their_residual_branches():
    torch.manual_seed(0)
    shallow = _tiny_stdit3(2).state_dict()
    grown = grow_depth(shallow, 6)
    deep = _tiny_stdit3(6)
    deep.load_state_dict(grown, strict=True)  # every key of a 6-block model, nothing else
    for i in range(6):
        for kind in ("spatial_blocks", "temporal_blocks"):
            src = f"{kind}.{i // 3}"
            assert torch.equal(grown[f"{kind}.{i}.attn.qkv.weight"], shallow[f"{src}.attn.qkv.weight"])
            assert torch.equal(grown[f"{kind}.{i}.scale_shift_table"], shallow[f"{src}.scale_shift_table"])
            for out in ("attn.proj.weight", "cross_attn.proj.bias", "mlp.fc2.weight"):
                assert torch.allclose(grown[f"{kind}.{i}.{out}"] * 3, shallow[f"{src}.{out}"])
    assert torch.equal(grown["final_layer.linear.weight"], shallow["final_layer.linear.weight"])
    with pytest.raises(ValueError, match="multiple of the source model's 2 blocks"):
        grow_depth(shallow, 5)


def test_grown_model_matches_its_source_to_first_order():
    # With residual branches of size eps, the k copies of a block add up to it up to O(eps^2): the grown model's
    # output is far closer to the source's than the branches' own contribution is.
    torch.manual_seed(1)
    shallow = _tiny_stdit3(2)
    with torch.no_grad():
        for name, p in shallow.named_parameters():
            if "blocks" in name and any(f".{out}." in name for out in RESIDUAL_OUTPUTS):
                p.mul_(1e-2)
    deep = _tiny_stdit3(8)
    deep.load_state_dict(grow_depth(shallow.state_dict(), 8))
    identity = _tiny_stdit3(2)
    branchless = {
        k: v * 0 if any(f".{o}." in k for o in RESIDUAL_OUTPUTS) else v for k, v in shallow.state_dict().items()
    }
    identity.load_state_dict(branchless)
    x = torch.randn(2, 3, 8, 8, 8)
    kwargs = dict(timestep=torch.tensor([500.0, 900.0]), y=torch.randn(2, 1, 4, 8), mask=torch.ones(2, 4).long())
    kwargs.update(fps=torch.tensor([8.0, 8.0]), height=torch.tensor([8.0, 8.0]), width=torch.tensor([8.0, 8.0]))
    with torch.no_grad():
        out, out_deep, out_id = (m(x, **kwargs) for m in (shallow, deep, identity))
    branches, first_order = (out - out_id).norm(), (out_deep - out).norm()
    assert first_order < 0.05 * branches, (float(first_order), float(branches))


def test_distillation_keeps_the_noisy_input_and_targets_the_teachers_velocity():
    from duca_video.sampling.rflow import add_noise

    train = _train_module()
    torch.manual_seed(2)
    teacher = _tiny_stdit3(2)
    x0, noise = torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 8, 8, 8)
    t = torch.tensor([250.0, 900.0])
    kwargs = dict(y=torch.randn(2, 1, 4, 8), mask=torch.ones(2, 4).long(), fps=torch.tensor([8.0, 8.0]))
    kwargs.update(height=torch.tensor([8.0, 8.0]), width=torch.tensor([8.0, 8.0]))
    x0_d, noise_d = train.distilled_pair((None, teacher), x0, noise, t, kwargs)
    x_t = add_noise(x0, noise, t)
    torch.testing.assert_close(add_noise(x0_d, noise_d, t), x_t, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(x0_d - noise_d, teacher(x_t, t, **kwargs), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- shipped models
DEEP_DIR = DEFAULT_TINY_DIR.parent / "tiny28"
# (folder, its size budget in the repository, depth)
SHIPPED = [(DEFAULT_TINY_DIR, 10 * 2**20, 4), (DEEP_DIR, 20 * 10**6, 28)]


def _shipped(directory):
    return pytest.mark.skipif(not (directory / "model.safetensors").is_file(), reason=f"{directory} not shipped")


@pytest.mark.parametrize(
    "directory,budget,depth", [pytest.param(*s, marks=_shipped(s[0]), id=s[0].name) for s in SHIPPED]
)
def test_shipped_testbed_model_loads_strictly_and_generates(directory, budget, depth):
    files = [p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")]
    assert sum(p.stat().st_size for p in files) <= budget
    config, testbed = read_tiny_config(directory)
    assert config.in_channels == 3 and config.depth == depth and testbed["sampler"]["use_timestep_transform"] is False
    bed = load_tiny(directory)  # strict: any missing/unexpected key raises; int8 rows come back as float32
    assert all(p.dtype == torch.float32 for p in bed.model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every caption word is in the vocabulary
        video = bed.generate(
            ["a large red square moving left on a dark background"], seeds=[0], sampler=_few_steps(bed.sampler)
        )
    t, h, w = testbed["num_frames"], testbed["height"], testbed["width"]
    assert video.shape == (1, 3, t, h, w) and video.abs().max() <= 1 and torch.isfinite(video).all()


@pytest.mark.slow
@pytest.mark.parametrize("directory", [pytest.param(s[0], marks=_shipped(s[0]), id=s[0].name) for s in SHIPPED])
def test_shipped_testbed_model_follows_colour_and_direction(directory):
    # 16 of the evaluation's prompts (every colour and direction appears), the model's own sampler (30 steps,
    # CFG 4); the full measurement (100 prompts) is `python -m duca_video.testbed.evaluate`.
    from duca_video.testbed.evaluate import evaluate

    scores = evaluate(load_tiny(directory), n=16, seed=0)
    assert scores["colour"] >= 14 / 16 and scores["direction"] >= 14 / 16, scores


def _few_steps(sampler):
    import dataclasses

    return dataclasses.replace(sampler, num_sampling_steps=3)
