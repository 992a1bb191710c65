"""scripts/inference.py on bad input (configs/tiny.py, CPU): exit status 2, one `error: ...` naming the input and
what is allowed, no traceback, nothing written, and (where the input can be checked without weights) no model
loaded. In-process through the script's own `main(argv)`, as tests/test_cli.py does; subprocesses only where
the real command line matters (bytes that are not UTF-8, a config that calls exit)."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from duca_video import pipeline

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "inference.py"
TINY = ROOT / "configs" / "tiny.py"
WEIGHTS = ROOT / "weights" / "tiny"
PROMPT = "a large red square moving left on a dark background"
main = runpy.run_path(str(SCRIPT), run_name="inference_cli")["main"]


@pytest.fixture
def no_models(monkeypatch):
    monkeypatch.setattr(pipeline, "load_models", lambda *a, **k: pytest.fail("models loaded despite bad input"))


def refused(tmp_path, capsys, *argv, config=TINY, checked_before_start=True):
    """Run the CLI; assert exit 2 with one clean error and no video anywhere under tmp_path (and, for input
    checked before the run starts, no save folder either); return the error."""
    code = main(
        [
            "--config",
            str(config),
            "--save-dir",
            str(tmp_path / "d" / "out"),
            "--num-sampling-steps",
            "1",
            "--quiet",
            *argv,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not list(tmp_path.rglob("*.mp4"))
    assert not checked_before_start or not (tmp_path / "d" / "out").exists()
    return err


# ------------------------------------------------------------------------------- contradicting or empty settings
def test_an_empty_save_dir_is_refused_not_the_working_directory(tmp_path, capsys, no_models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["--config", str(TINY), "--save-dir", "", "--quiet", "--prompt", PROMPT])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: save_dir='' is not allowed: it is empty"), err
    assert not list(tmp_path.iterdir())


def test_a_step_variant_longer_than_the_job_is_refused(tmp_path, capsys, no_models):
    err = refused(tmp_path, capsys, "--prompt", PROMPT, "--cache", "steps", "--cache-opt", "num_steps=50")
    assert "steps.num_steps=50 is more than the job's num_sampling_steps (1); allowed: 1..1" in err


# ------------------------------------------------------------------------------------------ names and prompts
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sample-name", "../../x"], "sample_name: '../../x' is a path"),
        (["--sample-name", "{tmp}/abs"], "sample_name: '{tmp}/abs' is a path"),
        (["--sample-name", "a/b"], "sample_name: 'a/b' is a path"),
        (["--sample-name", ".."], "sample_name: '..' is a path"),
        (["--sample-name", ""], "sample_name: it is empty"),
        (["--sample-name", "a\0b"], "sample_name='a\\x00b' is not allowed: it contains a NUL character"),
        (["--sample-name", ".hidden"], "sample_name: '.hidden' starts with '.'"),
        (["--prompt-as-path", "--prompt", "a/b", "a_b"], "'a_b-0' from prompt 1 ('a/b'), prompt 2 ('a_b')"),
        (["--prompt-as-path", "--prompt", "x y", "x y"], "'x y-0' from prompt 1 ('x y'), prompt 2 ('x y')"),
        (["--prompt", ""], "prompt 1 (--prompt) is empty"),
        (["--prompt", "  \t "], "prompt 1 (--prompt) is empty"),
        (["--prompt", "a\0b"], "prompt 1 (--prompt) contains a NUL character at position 1"),
        (["--prompt", "a\nb"], "prompt 1 (--prompt) contains the control character '\\n'"),
        (["--prompt", "a\ud800b"], "prompt 1 (--prompt) cannot be encoded as UTF-8 (surrogates not allowed"),
        (["--prompt-path", "{tmp}/nul.txt"], "prompt 1 (prompt file '{tmp}/nul.txt', line 3) contains a NUL"),
        (["--prompt-path", "{tmp}/latin1.txt"], "prompt file '{tmp}/latin1.txt' is not UTF-8 text (a binary"),
        (["--prompt-path", "{tmp}"], "prompt file '{tmp}' is a folder, not a file"),
    ],
)
def test_bad_names_and_prompts(tmp_path, capsys, no_models, argv, message):
    (tmp_path / "nul.txt").write_bytes(f"{PROMPT}\n\nthe second\0prompt\n".encode())
    (tmp_path / "latin1.txt").write_bytes(f"{PROMPT}\ncaf\xe9\n".encode("latin-1"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    first = [] if "--prompt-path" in argv else ["--prompt", PROMPT]  # a valid prompt in the same batch
    err = refused(tmp_path, capsys, *first, *argv)
    assert message.replace("{tmp}", str(tmp_path)) in err


def test_prompt_bytes_that_are_not_utf8_on_the_command_line(tmp_path):
    # The shell hands Python undecodable bytes as lone surrogates: refused, naming the prompt, before any load.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--config",
        str(TINY),
        "--save-dir",
        str(tmp_path / "out"),
        "--prompt",
        PROMPT,
        os.fsencode("caf") + b"\xe9",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: prompt 1 (--prompt) cannot be encoded as UTF-8")
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_a_prompt_only_the_text_encoder_refuses_fails_alone(tmp_path, capsys):
    # "..." is text (it passes every check before loading; sent as written, since Open-Sora's cleaning would
    # empty it and refuse it up front) but the word encoder finds no word in it: that video fails (exit 1,
    # listed), the valid prompts batched with it are still written.
    out = tmp_path / "out"
    code = main(
        [
            "--config",
            str(TINY),
            "--prompt",
            PROMPT,
            "...",
            PROMPT.replace("red", "blue"),
            "--batch-size",
            "3",
            "--save-dir",
            str(out),
            "--num-sampling-steps",
            "1",
            "--quiet",
            "--no-count-flops",
            "--no-clean-prompts",
        ]
    )
    assert code == 1
    assert "FAILED sample_0001" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.mp4")) == ["sample_0000.mp4", "sample_0002.mp4"]


# ------------------------------------------------------------------------------------------ numbers and devices
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cfg-scale", "nan"], "scheduler.cfg_scale=nan is not allowed: it must be a finite number"),
        (["--cfg-scale", "inf"], "scheduler.cfg_scale=inf is not allowed: it must be a finite number"),
        (["--aes", "nan"], "aes=nan is not allowed: it must be a finite number"),
        (["--flow=-inf"], "flow=-inf is not allowed: it must be a finite number"),
        (["--seed", "-1"], "seed=-1 is not allowed: seeds must be in 0..2**63-1"),
        (["--seed", str(2**64)], f"seed={2**64} is not allowed: seeds must be in 0..2**63-1"),
        (["--seed", str(2**63 - 1), "--num-sample", "2"], "(and seed + num_sample - 1 = 9223372036854775808)"),
        (["--seed", "0", "--num-sample", str(10**7)], "one run plans at most 1000000"),
        (["--num-frames", str(10**20)], "the video would have more values than a tensor can hold"),
        (["--num-sampling-steps", str(10**20)], "at most scheduler.num_timesteps (1000)"),
        (["--save-fps", str(2**40)], f"save_fps={2**40} is not allowed: an mp4 frame rate is at most 2**31-1"),
        (["--image-size", str(10**11), "16"], "the mp4 writer (ffmpeg) refuses frames"),
        (["--seed", "x"], "argument --seed: invalid int value: 'x' (see scripts/inference.py --help)"),
        (["--device", "cpu:1"], "device='cpu:1' is not allowed; allowed: auto, cpu, cuda, cuda:N"),
        (["--device", "cuda:x"], "device='cuda:x' is not allowed; allowed: auto, cpu, cuda, cuda:N"),
    ],
)
def test_bad_numbers_and_devices(tmp_path, capsys, no_models, argv, message):
    try:
        err = refused(tmp_path, capsys, "--prompt", PROMPT, *argv)
    except SystemExit as exc:  # argparse's own errors (a non-int) leave through SystemExit(2)
        err = capsys.readouterr().err
        assert exc.code == 2 and err.startswith("error: ")
    assert message in err


# ------------------------------------------------------------------------------------------ cache settings
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cache-opt", "recompute_ratio=True"], "recompute_ratio=True is invalid; allowed: a finite number"),
        (["--cache-opt", "recompute_ratio=nan"], "recompute_ratio='nan' is invalid; allowed: a finite number"),
        (["--cache-opt", "age_bonus=1e999"], "age_bonus=inf is invalid; allowed: a finite number"),
        (["--cache-opt", "recompute=mlpp"], "recompute=('mlpp',) is invalid; allowed: a subset of ('attn'"),
        (["--cache-opt", "recompute=[1]"], "recompute=[1] is invalid; allowed: a list of names from ('attn'"),
        (["--cache-opt", "selector=3"], "selector=3 is invalid; allowed: one of ('random'"),
        (["--cache", "pab", "--cache-opt", "threshold=5"], "threshold=5 is invalid; allowed: a list of 2 finite"),
        (["--cache", "steps", "--cache-opt", "num_steps=True"], "num_steps=True is invalid; allowed: an int"),
    ],
)
def test_cache_settings_are_type_checked(tmp_path, capsys, no_models, argv, message):
    err = refused(tmp_path, capsys, "--prompt", PROMPT, *argv)
    assert err.startswith("error: cache: cache method") and message in err


def test_a_list_setting_given_as_one_word_is_a_list_of_words(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "--config",
            str(TINY),
            "--prompt",
            PROMPT,
            "--save-dir",
            str(out),
            "--num-sampling-steps",
            "1",
            "--quiet",
            "--no-count-flops",
            "--cache-opt",
            "recompute=attn,mlp",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "sample_0000.json").read_text())["method_config"]["recompute"] == ["attn", "mlp"]


# ------------------------------------------------------------------------------------------ config files
_RANDOM = "_weights = None\n"  # the tiny config's switch to random init, so `model` fields are read


@pytest.mark.parametrize(
    "text, message",
    [
        ("import sys\nsys.exit(3)\n", "called exit(3) while it ran"),
        ("exit()\n", "called exit(None) while it ran"),
        ("raise SystemExit('bye')\n", "called exit('bye') while it ran"),
        (b"\x00\x01binary", "is not a Python text file (it contains NUL bytes"),
        (b"save_dir = 'caf\xe9'\n", "is not readable Python source text"),
        (
            "model = dict(type='STDiT3', depth=2, hidden_size=32, num_heads=2, patch_size=(1.7, 2, 2))\n",
            "model: STDiT3Config.patch_size=(1.7, 2, 2) is not allowed: expected 3 positive ints",
        ),
        (
            "model = dict(type='STDiT3', depth=2, hidden_size=32, num_heads=2, qk_norm='yes')\n",
            "model: STDiT3Config.qk_norm='yes' is not allowed: expected True or False",
        ),
        (
            "model = dict(type='STDiT3', depth=-2, hidden_size=32, num_heads=2)\n",
            "model: STDiT3Config.depth=-2 is not allowed: expected a positive int",
        ),
        (
            "model = dict(type='STDiT3', depth=2, hidden_size=32, num_heads=2, mlp_ratio=float('nan'))\n",
            "model: STDiT3Config.mlp_ratio=nan is not allowed: expected a finite number > 0",
        ),
        (
            "scheduler = dict(type='rflow', use_timestep_transform=False, cfg_scale=float('inf'))\n",
            "scheduler.cfg_scale=inf is not allowed: it must be a finite number",
        ),
    ],
)
def test_bad_config_files(tmp_path, capsys, no_models, text, message):
    config = tmp_path / "bad.py"
    if isinstance(text, bytes):  # the whole file
        config.write_bytes(text)
    else:  # appended to the tiny config, so only the line under test is wrong
        config.write_text(TINY.read_text().replace("_weights = str(", f"{_RANDOM}_unused = str(") + text)
    err = refused(tmp_path, capsys, "--prompt", PROMPT, config=config)
    assert message in err
    if "config file" in err:
        assert err.startswith(f"error: config file '{config}'")


def test_a_config_that_exits_does_not_end_the_program_with_its_status(tmp_path):
    config = tmp_path / "exits.py"
    config.write_text("import sys\nsys.exit(0)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(config), "--prompt", PROMPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        done.returncode == 2
        and done.stderr == f"error: config file '{config}' called exit(0) while it ran; a config only sets fields\n"
    )


# ------------------------------------------------------------------------------------------ checkpoints
def _weights(tmp_path, **files):
    """A copy of the tiny model's folder (model.safetensors + config.json), with `files` replaced."""
    folder = tmp_path / "w"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(WEIGHTS / name, folder / name)
    for name, data in files.items():
        name = name.replace("_", ".")
        (folder / name).write_bytes(data(WEIGHTS / name) if callable(data) else data)
    return folder


@pytest.mark.parametrize(
    "files, message",
    [
        (
            {"model_safetensors": lambda p: p.read_bytes()[:-1]},
            "model.safetensors cannot be read as safetensors "
            "weights (truncated or corrupt?): Error while deserializing header: incomplete metadata",
        ),
        ({"model_safetensors": b""}, "model.safetensors cannot be read as safetensors weights"),
        ({"model_safetensors": b"\x07" * 64}, "model.safetensors cannot be read as safetensors weights"),
        ({"config_json": lambda p: p.read_bytes()[:40]}, "config.json is not valid JSON (truncated?): line"),
        ({"config_json": b"[4, 128]"}, "config.json holds a JSON list, expected an object of config keys"),
        ({"config_json": b"\xff\xfe{}"}, "config.json is not UTF-8 text"),
        (
            {"config_json": b'{"depth": 4, "hidden_size": 128, "num_heads": 4, "patch_size": [4.5, 2, 2]}'},
            "config.json, then the config's model fields): STDiT3Config.patch_size=[4.5, 2, 2] is not allowed",
        ),
    ],
)
def test_unreadable_checkpoints(tmp_path, capsys, no_models, files, message):
    folder = _weights(tmp_path, **files)
    err = refused(tmp_path, capsys, "--prompt", PROMPT, "--ckpt-path", str(folder))
    assert str(folder) in err and message in err


def test_a_torch_file_cut_inside_its_data(tmp_path, capsys):
    # An old-style torch.save pickle has no directory to check up front: it fails while loading, still cleanly.
    folder = tmp_path / "w"
    folder.mkdir()
    shutil.copyfile(WEIGHTS / "config.json", folder / "config.json")
    torch.save(load_file(WEIGHTS / "model.safetensors"), folder / "model.pt", _use_new_zipfile_serialization=False)
    (folder / "model.pt").write_bytes((folder / "model.pt").read_bytes()[:200_000])
    err = refused(tmp_path, capsys, "--prompt", PROMPT, "--ckpt-path", str(folder), checked_before_start=False)
    assert f"model weights: {folder / 'model.pt'} cannot be read as pt weights (truncated or corrupt?)" in err


def test_a_weights_file_reads_the_config_json_beside_it(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "--config",
            str(TINY),
            "--prompt",
            PROMPT,
            "--save-dir",
            str(out),
            "--num-sampling-steps",
            "1",
            "--quiet",
            "--no-count-flops",
            "--ckpt-path",
            str(WEIGHTS / "model.safetensors"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (out / "sample_0000.mp4").is_file()
