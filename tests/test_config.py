"""Config files, their validation, CLI overrides, sizes and weight paths: no model is built here."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from duca_video import sizes
from duca_video.configs import ConfigError, InferenceConfig, apply_args, build_parser, load_config, read_config_file
from duca_video.configs.preflight import InputError, check_cache_settings, resolve_device, resolve_weights
from duca_video.io import PromptError
from duca_video.jobs import load_prompts
from duca_video.models import STDiT3Config
from tests.upstream import open_sora_root, skip_reason

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def make(**fields):
    return InferenceConfig.from_dict({"image_size": (16, 16), **fields})


def args(*argv):
    return build_parser().parse_args(["--config", "x.py", *argv])


# ------------------------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize(
    "name, size, method",
    [("duca_480p", (480, 854), "duca"), ("duca_720p", (720, 1280), "duca"), ("baseline_480p", (480, 854), "none")],
)
def test_opensora_configs(name, size, method):
    cfg = load_config(CONFIGS / f"{name}.py")
    assert cfg.size == size and cfg.num_frames == 51 and cfg.cache.method == method
    assert (cfg.model.type, cfg.vae.type, cfg.text_encoder.type) == ("STDiT3-XL/2", "OpenSoraVAE_V1_2", "t5")
    assert cfg.scheduler.num_sampling_steps == 30 and cfg.scheduler.cfg_scale == 7.0 and cfg.aes == 6.5
    assert cfg.dtype == "bf16" and cfg.fps == 24 and cfg.video_fps == 24


def test_tiny_config_uses_the_shipped_weights_or_random_init(tmp_path):
    import re

    cfg = load_config(CONFIGS / "tiny.py")
    shipped = CONFIGS.parent / "weights" / "tiny"
    assert cfg.model.type == "STDiT3" and cfg.model.from_pretrained == cfg.text_encoder.from_pretrained == str(shipped)
    assert not cfg.model.extra  # the architecture comes from the weights' config.json
    assert (cfg.vae.type, cfg.text_encoder.type) == ("PixelVAE", "word")
    assert not cfg.scheduler.use_timestep_transform and cfg.size == (16, 16) and cfg.num_frames >= 1
    # The documented one-line switch back to a randomly initialised model (architecture from _random_init).
    text = re.sub(r"^_weights = .*$", "_weights = None", (CONFIGS / "tiny.py").read_text(), flags=re.MULTILINE)
    switched = tmp_path / "tiny.py"
    switched.write_text(text)
    cfg = load_config(switched)
    assert cfg.model.from_pretrained is None and cfg.model.extra["depth"] >= 1


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"colour": 1}, "unknown key 'colour'; allowed: resolution"),
        ({"vae": {"type": "OpenSoraVAE_V1_2", "foo": 1}}, "vae: unknown key 'foo'"),
        ({"scheduler": {"steps": 3}}, "scheduler: unknown key 'steps'; allowed: type, num_sampling_steps"),
        ({"model": {"depthh": 3}}, "model: unknown STDiT3 config keys ['depthh']"),
        ({"model": {"type": "DiT"}}, "model.type='DiT' is not allowed: expected one of 'STDiT3-XL/2', 'STDiT3'"),
        ({"text_encoder": {"type": "t5", "foo": 1}}, "text_encoder: unknown key 'foo'"),
        ({"batch_size": "2"}, "batch_size='2' is not allowed: expected an int"),
        ({"batch_size": 0}, "batch_size=0 is not allowed: it must be > 0"),
        ({"seed": 1.5}, "seed=1.5 is not allowed"),
        ({"dtype": "fp8"}, "dtype='fp8' is not allowed; allowed: fp32, fp16, bf16"),
        ({"scheduler": {"cfg_scale": "high"}}, "scheduler.cfg_scale='high' is not allowed: expected a number"),
        ({"cache": {"method": "fast"}}, "cache.method='fast' is not allowed; allowed: none, steps, duca"),
        ({"cache": {"method": "none", "ratio": 0.1}}, "cache: settings 'ratio' given for method 'none'"),
        ({"image_size": (16,)}, "image_size=(16,) is not allowed: expected 2 ints"),
        ({"prompt_as_path": "yes"}, "prompt_as_path='yes' is not allowed: expected True or False"),
        ({"end_index": 0}, "end_index=0 must be greater than start_index=0"),
        ({"device": "tpu"}, "device='tpu' is not allowed"),
        ({"device": "cuda:x"}, "device='cuda:x' is not allowed; allowed: auto, cpu, cuda, cuda:N"),
        ({"scheduler": {"cfg_scale": float("nan")}}, "scheduler.cfg_scale=nan is not allowed: it must be a finite"),
        ({"aes": float("-inf")}, "aes=-inf is not allowed: it must be a finite number"),
        ({"scheduler": {"num_sampling_steps": 1001}}, "num_sampling_steps=1001 is not allowed: at most scheduler."),
        ({"seed": -1}, "seed=-1 is not allowed: seeds must be in 0..2**63-1"),
        ({"seed": 2**63}, f"seed={2**63} is not allowed: seeds must be in 0..2**63-1"),
        ({"fps": 2**31}, f"fps={2**31} is not allowed: an mp4 frame rate is at most 2**31-1"),
        ({"save_dir": "out\0"}, "save_dir='out\\x00' is not allowed: it contains a NUL character"),
        ({"sample_name": "../up"}, "sample_name: '../up' is a path; give a plain name"),
        ({"sample_name": ""}, "sample_name: it is empty"),
        ({"sample_name": "x" * 201}, "sample_name: it is 201 bytes long; at most 200"),
        ({"model": {"type": "STDiT3", "qk_norm": "yes"}}, "model: STDiT3Config.qk_norm='yes' is not allowed: expected"),
        ({"model": {"type": "STDiT3", "patch_size": (1.7, 2, 2)}}, "model: STDiT3Config.patch_size=(1.7, 2, 2)"),
    ],
)
def test_validation_names_the_key(fields, message):
    with pytest.raises(ConfigError) as err:
        make(**fields)
    assert message in str(err.value)


def test_size_from_the_table_and_its_errors():
    cfg = InferenceConfig.from_dict({"resolution": "240p", "aspect_ratio": "2:3"})
    assert cfg.size == (262, 393)  # upstream's hand-edited entry, not the formula's
    with pytest.raises(ConfigError, match="resolution '1080p' is not in the table; allowed: 144p, 240p, 360p, 480p"):
        InferenceConfig.from_dict({"resolution": "1080p", "aspect_ratio": "9:16"})
    with pytest.raises(ConfigError, match="aspect_ratio '1:7' is not in the table; allowed: 3:8, 9:21"):
        InferenceConfig.from_dict({"resolution": "480p", "aspect_ratio": "1:7"})
    with pytest.raises(ConfigError, match="set image_size"):
        InferenceConfig.from_dict({"resolution": "480p"})


@pytest.mark.parametrize("given, frames", [("2s", 51), ("4s", 102), ("8s", 204), ("16s", 408), ("68", 68), (1, 1)])
def test_num_frames_as_frames_or_seconds(given, frames):
    assert make(num_frames=given).num_frames == frames


def test_num_frames_errors():
    with pytest.raises(ConfigError, match="num_frames '3s' is neither a frame count nor one of 2s=51, 4s=102"):
        make(num_frames="3s")
    with pytest.raises(ConfigError, match="num_frames=10 is not valid with the timestep transform.*use 1"):
        make(num_frames=10)
    assert make(num_frames=10, scheduler={"use_timestep_transform": False}).num_frames == 10
    with pytest.raises(ConfigError, match="num_frames must be >= 1"):
        make(num_frames=0)


def test_tables_match_upstream():
    root = open_sora_root()
    if root is None:
        pytest.skip(skip_reason())
    source = (root / "opensora" / "datasets" / "aspect.py").read_text()
    namespace: dict = {}
    exec(compile(source, "aspect.py", "exec"), namespace)  # upstream's tables, read as data
    for res in sizes.RESOLUTIONS:
        for ar in sizes.ASPECT_RATIOS:
            assert tuple(namespace["get_image_size"](res, ar)) == sizes.image_size(res, ar), (res, ar)
    for name, frames in namespace["NUM_FRAMES_MAP"].items():
        assert sizes.parse_num_frames(name) == frames


# ------------------------------------------------------------------------------------------- files
def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("resolution = '480p'\nmodel = dict(type=\n")
    with pytest.raises(ConfigError, match=r"bad.py' does not parse: line \d"):
        read_config_file(bad)
    bad.write_text("x = 1 / 0\n")
    with pytest.raises(ConfigError, match="failed to run: ZeroDivisionError"):
        read_config_file(bad)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"import sys\nsys.exit(4)\n", "called exit(4) while it ran"),
        (b"exit()\n", "called exit(None) while it ran"),
        (b"fps = 24\x00\n", "is not a Python text file (it contains NUL bytes"),
        (b"save_dir = 'caf\xe9'\n", "is not readable Python source text"),
    ],
)
def test_config_files_that_exit_or_are_not_text(tmp_path, data, message):
    path = tmp_path / "c.py"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=re.escape(f"config file '{path}' {message}")):
        read_config_file(path)
    with pytest.raises(ConfigError, match="it is a folder"):
        read_config_file(tmp_path)


def test_config_file_in_its_declared_encoding(tmp_path):
    path = tmp_path / "c.py"
    path.write_bytes(b"# -*- coding: latin-1 -*-\nsave_dir = 'caf\xe9'\n")
    assert read_config_file(path) == {"save_dir": "caf\u00e9"}


def test_private_names_modules_and_functions_are_not_fields(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("import math\n_h = 16\ndef f():\n    pass\nimage_size = (_h, _h)\nnum_frames = 1\n")
    assert read_config_file(path) == {"image_size": (16, 16), "num_frames": 1}


# ------------------------------------------------------------------------------------------- CLI overrides
@pytest.mark.parametrize(
    "argv, key, value",
    [
        (["--seed", "7"], ("seed",), 7),
        (["--num-sampling-steps", "5"], ("scheduler", "num_sampling_steps"), 5),
        (["--cfg-scale", "3.5"], ("scheduler", "cfg_scale"), 3.5),
        (["--ckpt-path", "a.safetensors"], ("model", "from_pretrained"), "a.safetensors"),
        (["--vae-path", "v"], ("vae", "from_pretrained"), "v"),
        (["--text-encoder-path", "t"], ("text_encoder", "from_pretrained"), "t"),
        (["--batch-size", "3"], ("batch_size",), 3),
        (["--num-sample", "2"], ("num_sample",), 2),
        (["--num-frames", "4s"], ("num_frames",), 102),
        (["--image-size", "32", "48"], ("image_size",), (32, 48)),
        (["--fps", "12"], ("fps",), 12),
        (["--save-fps", "6"], ("save_fps",), 6),
        (["--start-index", "2"], ("start_index",), 2),
        (["--end-index", "9"], ("end_index",), 9),
        (["--save-dir", "out"], ("save_dir",), "out"),
        (["--sample-name", "clip"], ("sample_name",), "clip"),
        (["--prompt-as-path"], ("prompt_as_path",), True),
        (["--save-latents"], ("save_latents",), True),
        (["--no-count-flops"], ("count_flops",), False),
        (["--quiet"], ("quiet",), True),
        (["--aes", "5"], ("aes",), 5.0),
        (["--dtype", "fp16"], ("dtype",), "fp16"),
        (["--device", "cpu"], ("device",), "cpu"),
        (["--prompt", "a", "b", "--prompt", "c"], ("prompt",), ["a", "b", "c"]),
        (["--prompt-path", "p.txt"], ("prompt_path",), "p.txt"),
        (["--cache", "toca"], ("cache", "method"), "toca"),
    ],
)
def test_every_flag_overrides_its_field(argv, key, value):
    base = {"image_size": (16, 16), "num_frames": 68, "prompt_path": "file.txt"}
    cfg = InferenceConfig.from_dict(apply_args(base, args(*argv)))
    got = cfg
    for part in key:
        got = getattr(got, part)
    assert got == value


def test_flag_interactions():
    base = {"image_size": (16, 16), "prompt": ["x"], "cache": {"method": "duca", "recompute_ratio": 0.2}}
    # A size from the table on the command line replaces a fixed size in the file.
    cfg = InferenceConfig.from_dict(apply_args(base, args("--resolution", "144p", "--aspect-ratio", "1:1")))
    assert cfg.size == (192, 192)
    # Another method starts from its own defaults; the same method keeps the file's settings.
    assert InferenceConfig.from_dict(apply_args(base, args("--cache", "fora"))).cache.overrides == {}
    kept = InferenceConfig.from_dict(apply_args(base, args("--cache", "duca", "--cache-opt", "selector=k_norm")))
    assert kept.cache.overrides == {"recompute_ratio": 0.2, "selector": "k_norm"}
    typed = InferenceConfig.from_dict(apply_args(base, args("--cache-opt", "warmup_steps=2", "--cache-opt", "x=[1]")))
    assert typed.cache.overrides == {"recompute_ratio": 0.2, "warmup_steps": 2, "x": [1]}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_args(base, args("--cache-opt", "oops"))
    assert InferenceConfig.from_dict(apply_args(base, args("--prompt-path", "p.txt"))).prompt is None


# ------------------------------------------------------------------------------------------- weights
def test_weight_paths_flag_config_env(tmp_path, monkeypatch):
    for var in ("DUCA_CKPT_PATH", "DUCA_VAE_PATH", "DUCA_T5_PATH"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(CONFIGS / "duca_480p.py")
    with pytest.raises(InputError) as err:
        resolve_weights(cfg)
    text = str(err.value)
    for needle in (
        "--ckpt-path PATH, set DUCA_CKPT_PATH",
        "--vae-path PATH, set DUCA_VAE_PATH",
        "--text-encoder-path PATH, set DUCA_T5_PATH",
    ):
        assert needle in text
    save_file({"w": torch.zeros(1)}, str(tmp_path / "dit.safetensors"))  # a readable header is checked, not keys
    (tmp_path / "vae").mkdir()
    monkeypatch.setenv("DUCA_CKPT_PATH", str(tmp_path / "dit.safetensors"))
    monkeypatch.setenv("DUCA_VAE_PATH", str(tmp_path / "vae"))
    monkeypatch.setenv("DUCA_T5_PATH", str(tmp_path / "no-t5-here"))
    with pytest.raises(InputError, match="text_encoder.*no-t5-here' does not exist") as err:
        resolve_weights(cfg)
    assert "model" not in str(err.value).split("missing weights:")[1].split("text_encoder")[0]
    (tmp_path / "t5").mkdir()
    cfg = load_config(CONFIGS / "duca_480p.py", args("--text-encoder-path", str(tmp_path / "t5")))
    paths = resolve_weights(cfg)
    assert paths == {
        "model": str(tmp_path / "dit.safetensors"),
        "vae": str(tmp_path / "vae"),
        "text_encoder": str(tmp_path / "t5"),
    }
    # Testbed sections never read the variables (a global DUCA_CKPT_PATH must not leak into the tiny model).
    shipped = str(CONFIGS.parent / "weights" / "tiny")
    assert resolve_weights(load_config(CONFIGS / "tiny.py")) == {"model": shipped, "vae": None, "text_encoder": shipped}


# ------------------------------------------------------------------------------------------- model architecture
@pytest.mark.parametrize(
    "fields, error, message",
    [
        (dict(patch_size=(1.7, 2, 2)), TypeError, "STDiT3Config.patch_size=(1.7, 2, 2) is not allowed: expected 3"),
        (dict(patch_size="122"), TypeError, "STDiT3Config.patch_size='122' is not allowed"),
        (dict(qk_norm="yes"), TypeError, "STDiT3Config.qk_norm='yes' is not allowed: expected True or False"),
        (dict(pred_sigma=1), TypeError, "STDiT3Config.pred_sigma=1 is not allowed: expected True or False"),
        (dict(depth=-1), ValueError, "STDiT3Config.depth=-1 is not allowed: expected a positive int"),
        (dict(depth=True), TypeError, "STDiT3Config.depth=True is not allowed: expected a positive int"),
        (dict(input_sq_size=2.5), TypeError, "STDiT3Config.input_sq_size=2.5 is not allowed"),
        (dict(mlp_ratio=float("nan")), ValueError, "STDiT3Config.mlp_ratio=nan is not allowed: expected a finite"),
        (dict(mlp_ratio="4"), TypeError, "STDiT3Config.mlp_ratio='4' is not allowed"),
    ],
)
def test_stdit3_config_types_name_the_field(fields, error, message):
    with pytest.raises(error, match=re.escape(message)):
        STDiT3Config(**fields)
    assert STDiT3Config(patch_size=[1, 2, 2]).patch_size == (1, 2, 2)  # a JSON list is fine


# ------------------------------------------------------------------------------------------- cache settings
@pytest.mark.parametrize(
    "opts, expected",
    [
        (["recompute=mlp"], {"recompute": ("mlp",)}),
        (["recompute=attn,mlp"], {"recompute": ("attn", "mlp")}),
        (["recompute_ratio=1"], {"recompute_ratio": 1.0}),
        (["recompute_ratio=True"], "recompute_ratio=True is invalid; allowed: a finite number"),
        (["recompute_ratio=1e999"], "recompute_ratio=inf is invalid; allowed: a finite number"),
        (["warmup_steps=2.0"], "warmup_steps=2.0 is invalid; allowed: an int"),
        (["pattern=full,conservative"], "pattern=('full', 'conservative') is invalid; allowed: a sequence of 3"),
        (["selector=[1]"], "selector=[1] is invalid; allowed: one of ('random'"),
    ],
)
def test_cache_options_are_typed_by_their_field(opts, expected):
    from duca_video.cache import make_config

    flags = [part for opt in opts for part in ("--cache-opt", opt)]
    cfg = InferenceConfig.from_dict(apply_args({"image_size": (16, 16), "cache": {"method": "duca"}}, args(*flags)))
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=re.escape(f"cache: cache method 'duca': {expected}")):
            check_cache_settings(cfg)
        return
    check_cache_settings(cfg)
    made = make_config("duca", **cfg.cache.overrides)
    assert {k: repr(getattr(made, k)) for k in expected} == {k: repr(v) for k, v in expected.items()}  # 1 -> 1.0


# ------------------------------------------------------------------------------------------- devices and prompts
@pytest.mark.parametrize("name", ["cuda:x", "cpu:1", "cuda:-1", "gpu"])
def test_device_strings(name):
    with pytest.raises(InputError, match=f"device '{re.escape(name)}'"):
        resolve_device(name)
    assert resolve_device("cpu").type == "cpu" and resolve_device("auto").type in ("cpu", "cuda")


def test_prompt_file_lines_and_duplicate_names(tmp_path):
    path = tmp_path / "p.txt"
    # A BOM is dropped; U+2028 inside a prompt does not split its line (line numbers are an editor's).
    path.write_text("\ufeffa cat\n\nA dog\u2028 runs\n  \nx/y\nx_y\n\n\0", encoding="utf-8")
    base = {"image_size": (16, 16), "prompt_path": str(path)}
    assert load_prompts(make(**base, end_index=3)) == [(0, "a cat"), (1, "A dog\u2028 runs"), (2, "x/y")]
    with pytest.raises(PromptError, match=re.escape(f"prompt 4 (prompt file '{path}', line 8) contains a NUL")):
        load_prompts(make(**base))
    with pytest.raises(PromptError) as err:
        load_prompts(make(**base, end_index=4, prompt_as_path=True, num_sample=2))
    assert "'x_y-0' from prompt 2 ('x/y'), prompt 3 ('x_y')" in str(err.value)
    assert "'x_y-1' from prompt 2 ('x/y'), prompt 3 ('x_y')" in str(err.value)
    assert len(load_prompts(make(**base, end_index=4, num_sample=2))) == 4  # sample_NNNN names never clash
