"""scripts/inference.py end to end on configs/tiny.py (CPU, seconds), and its answers to bad input."""

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
import torch
from safetensors.torch import load_file

from duca_video import pipeline
from duca_video.configs.loader import load_config
from duca_video.jobs import RECORD_FIELDS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "inference.py"
TINY = ROOT / "configs" / "tiny.py"
FRAMES = load_config(TINY).num_frames
PROMPTS = [
    "a large red square moving left on a dark background",
    "a small blue circle moving up on a light background",
    "a large green circle moving right on a dark background",
    "a small yellow square moving down on a dark background",
]
main = runpy.run_path(str(SCRIPT), run_name="inference_cli")["main"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cli(*argv, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY), *argv]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def frames_of(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.slow
def test_end_to_end_then_everything_is_skipped(tmp_path, capsys):
    out = tmp_path / "out"
    # 5 steps: DuCa's default schedule (3 warm-up steps) reads its cache from step 4 on.
    argv = [
        "--prompt",
        *PROMPTS[:2],
        "--num-sample",
        "2",
        "--batch-size",
        "2",
        "--num-sampling-steps",
        "5",
        "--save-latents",
        "--save-dir",
        str(out),
        "--seed",
        "5",
    ]
    first = cli(*argv)
    assert first.returncode == 0, first.stderr
    assert "4 written, 0 skipped (already complete), 0 failed" in first.stdout
    assert "DiT:" in first.stdout and "TFLOPs per video" in first.stdout
    names = [f"sample_000{i}-{k}" for i in (0, 1) for k in (0, 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}{ext}" for n in names for ext in (".mp4", ".json", ".latent.safetensors")
    )
    for name in names:
        frames = frames_of(out / f"{name}.mp4")
        assert len(frames) == FRAMES and frames[0].shape == (16, 16, 3)
        record = json.loads((out / f"{name}.json").read_text())
        assert set(RECORD_FIELDS) <= set(record)
        k = int(name[-1])
        assert record["seed"] == 5 + k and record["sample_index"] == k and record["prompt"] in PROMPTS
        assert record["method"] == "duca" and record["method_config"]["warmup_steps"] >= 0
        assert record["steps"] == 5 and record["frames"] == FRAMES and record["video_size"] == [16, 16]
        assert record["world_size"] == 1 and record["batch_size"] == 2 and record["latency_s"] > 0
        assert record["dit_tflops"] > 0 and record["peak_memory_bytes"] >= 0 and record["cache_bytes"] > 0
        assert record["peak_memory_kind"] in ("process_peak_rss_growth", "process_max_rss_growth")
        latent = load_file(out / f"{name}.latent.safetensors")["latent"]
        assert latent.shape == (3, FRAMES, 16, 16) and latent.dtype == torch.float32
    # The second run (in-process: no second interpreter start) finds every video complete.
    assert main(["--config", str(TINY), *argv]) == 0
    assert "0 written, 4 skipped (already complete), 0 failed" in capsys.readouterr().out


def test_prompt_file_range_and_vbench_names(tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join([PROMPTS[0], "", PROMPTS[1], "   ", PROMPTS[2]]) + "\n")
    out = tmp_path / "out"
    code = main(
        [
            "--config",
            str(TINY),
            "--prompt-path",
            str(path),
            "--start-index",
            "1",
            "--end-index",
            "3",
            "--prompt-as-path",
            "--num-sampling-steps",
            "1",
            "--save-dir",
            str(out),
            "--quiet",
            "--cache",
            "none",
            "--no-count-flops",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p}-0.{e}" for p in PROMPTS[1:3] for e in ("mp4", "json"))
    record = json.loads((out / f"{PROMPTS[1]}-0.json").read_text())
    assert record["prompt_index"] == 1 and record["dit_tflops"] is None and record["method_config"] == {}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt-path", "{tmp}/empty.txt"], "prompt file '{tmp}/empty.txt' is empty"),
        (["--prompt-path", "{tmp}/nope.txt"], "prompt file '{tmp}/nope.txt' does not exist"),
        (["--prompt", "a", "--save-dir", "{tmp}/file.txt"], "save directory '{tmp}/file.txt' is not writable"),
        (["--prompt", "a", "--resolution", "999p", "--aspect-ratio", "9:16"], "resolution '999p' is not in the table"),
        (["--prompt", "a", "--resolution", "480p", "--aspect-ratio", "4:5"], "aspect_ratio '4:5' is not in the table"),
        (["--prompt", "a", "--num-frames", "3s"], "num_frames '3s' is neither a frame count nor one of 2s=51"),
        (["--prompt", "a", "--start-index", "1"], "--start-index 1 is past the end: --prompt has 1 prompt(s)"),
        (["--prompt", "a", "--cache-opt", "colour=red"], "cache: cache method 'duca' has no field(s) ['colour']"),
        (["--prompt", "a", "--batch-size", "0"], "batch_size=0 is not allowed"),
        ([], "no prompts: pass --prompt TEXT or --prompt-path FILE"),
    ],
)
def test_bad_input_fails_before_loading_models(tmp_path, monkeypatch, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "file.txt").write_text("not a folder")
    monkeypatch.setattr(pipeline, "load_models", lambda *a, **k: pytest.fail("models loaded despite bad input"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(["--config", str(TINY), "--save-dir", str(tmp_path / "out"), *argv])
    assert code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


def test_bad_config_and_missing_weights(tmp_path, monkeypatch, capsys):
    assert main(["--config", str(tmp_path / "none.py"), "--prompt", "a"]) == 2
    assert f"config file '{tmp_path / 'none.py'}' does not exist" in capsys.readouterr().err
    (tmp_path / "bad.py").write_text("fps = (24\n")
    assert main(["--config", str(tmp_path / "bad.py"), "--prompt", "a"]) == 2
    assert "bad.py' does not parse: line" in capsys.readouterr().err
    for var in ("DUCA_CKPT_PATH", "DUCA_VAE_PATH", "DUCA_T5_PATH"):
        monkeypatch.delenv(var, raising=False)
    config = str(ROOT / "configs" / "duca_480p.py")
    assert main(["--config", config, "--prompt", "a", "--save-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing weights" in err and "--ckpt-path PATH, set DUCA_CKPT_PATH" in err
    # Frames the VAE + timestep transform cannot take, at the real size.
    assert main(["--config", config, "--prompt", "a", "--num-frames", "10"]) == 2
    assert "num_frames=10 is not valid" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_job_leaves_no_partial_file_and_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "--prompt",
        *PROMPTS,
        *PROMPTS,
        "--batch-size",
        "1",
        "--save-dir",
        str(out),
        "--quiet",
        "--num-sampling-steps",
        "8",
        "--no-count-flops",
    ]
    proc = cli(*argv, wait=False)
    deadline = time.time() + 90
    while not list(out.glob("*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    for video in out.glob("*.mp4"):  # whatever was renamed into place is a whole video
        assert len(frames_of(video)) == FRAMES
    for record in out.glob("*.json"):
        assert record.with_suffix(".mp4").is_file()
    done = {p.stem for p in out.glob("*.json")}
    assert main(["--config", str(TINY), *argv]) == 0
    assert f"{8 - len(done)} written, {len(done)} skipped" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"sample_{i:04d}.{e}" for i in range(8) for e in ("mp4", "json")
    )


def test_a_stop_while_claiming_a_batch_leaves_no_lock(tmp_path, monkeypatch, capsys):
    """A SIGTERM / Ctrl-C that lands while a batch's videos are being locked (here: while the second one's files
    are checked) releases the locks already taken: none is left for the next job to wait on."""
    from duca_video.jobs import scan as job_module

    real, calls = job_module.check_output, []

    def stop_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(job_module, "check_output", stop_at_the_second)
    out = tmp_path / "out"
    code = main(
        [
            "--config",
            str(TINY),
            "--prompt",
            *PROMPTS[:3],
            "--batch-size",
            "3",
            "--save-dir",
            str(out),
            "--num-sampling-steps",
            "2",
            "--quiet",
            "--no-count-flops",
        ]
    )
    assert code == 130 and len(calls) == 2
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_sigterm_stops_cleanly(tmp_path):
    out = tmp_path / "out"
    proc = cli(
        "--prompt",
        *PROMPTS,
        "--batch-size",
        "1",
        "--save-dir",
        str(out),
        "--num-sampling-steps",
        "12",
        "--quiet",
        "--no-count-flops",
        wait=False,
    )
    deadline = time.time() + 90
    while not list(out.glob("*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the job finished before the signal arrived")
    assert proc.returncode == 130 and "(interrupted)" in stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file or lock left behind
    # The summary counts the whole job, not only what this run wrote before the stop.
    done = len(list(out.glob("*.json")))
    assert f"job: {done} of {len(PROMPTS)} video(s) complete on disk" in stdout


def test_shards_of_a_job_array_write_disjoint_shares_that_cover_the_job(tmp_path, capsys):
    # A SLURM array writing into one folder: --shard I/N takes the I-th of N contiguous shares of the videos.
    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "".join(f"a red circle moving {d} on a dark background\n" for d in ("left", "right", "up", "down", "left"))
    )
    out = tmp_path / "out"
    flags = [
        "--config",
        str(TINY),
        "--save-dir",
        str(out),
        "--prompt-path",
        str(prompts),
        "--num-sampling-steps",
        "1",
        "--quiet",
        "--batch-size",
        "2",
    ]
    written = []
    for i in range(3):
        assert main([*flags, "--shard", f"{i}/3"]) == 0
        written.append(sorted(p.stem for p in out.glob("*.mp4") if p.stem not in sum(written, [])))
    assert written == [["sample_0000", "sample_0001"], ["sample_0002", "sample_0003"], ["sample_0004"]]
    assert main([*flags]) == 0  # the whole job: complete
    assert "summary: 0 written, 5 skipped" in capsys.readouterr().out
    for bad in ("3/3", "1", "a/b", "0/0", "-1/2"):
        assert main([*flags, f"--shard={bad}"]) == 2
        assert f"error: shard={bad!r} is not allowed: expected I/N with 0 <= I < N" in capsys.readouterr().err
