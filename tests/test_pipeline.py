"""Prompts, names, crash-safe files and mp4 writing; the pipeline run in-process on the tiny testbed config."""

import json
import os
from pathlib import Path

import av
import pytest
import torch
from safetensors.torch import load_file

from duca_video import pipeline
from duca_video.configs import build_parser, load_config
from duca_video.io import (
    PromptError,
    append_scores,
    atomic_path,
    check_writable,
    load_prompt_file,
    remove_stale_temps,
    select_prompts,
    video_name,
    write_video,
)
from duca_video.jobs import plan_batches

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a large red square moving left on a dark background",
    "a small blue circle moving up on a light background",
    "a large green circle moving right on a dark background",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(tmp_path, *argv):
    flags = [
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        "--save-dir",
        str(tmp_path / "out"),
        "--quiet",
        "--num-sampling-steps",
        "2",
        *argv,
    ]
    if "--prompt" not in argv:
        flags += ["--prompt", *PROMPTS[:2]]
    return load_config(flags[1], build_parser().parse_args(flags))


def decode(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


# ------------------------------------------------------------------------------------------- prompts and names
def test_prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  first  \n\n   \nsecond\n")
    assert load_prompt_file(path) == ["first", "second"]
    path.write_text("\n  \n")
    with pytest.raises(PromptError, match="is empty"):
        load_prompt_file(path)
    with pytest.raises(PromptError, match="does not exist"):
        load_prompt_file(tmp_path / "missing.txt")


def test_select_prompts():
    assert select_prompts(["a", "b", "c"], 1, None, "f") == [(1, "b"), (2, "c")]
    assert select_prompts(["a", "b", "c"], 0, 2, "f") == [(0, "a"), (1, "b")]
    with pytest.raises(PromptError, match=r"--start-index 3 is past the end: f has 3 prompt\(s\), indices 0..2"):
        select_prompts(["a", "b", "c"], 3, None, "f")


def test_score_suffixes_as_open_sora():
    assert append_scores("a cat.", aes=6.5) == "a cat. aesthetic score: 6.5."
    assert append_scores("a cat. aesthetic score: 5.0.", aes=6.5) == "a cat. aesthetic score: 5.0."
    assert append_scores("a cat", aes=6.5, flow=4, camera="pan right") == (
        "a cat aesthetic score: 6.5. motion score: 4.0. camera motion: pan right."
    )
    assert append_scores("a cat") == "a cat"


def test_names():
    assert video_name(7, "x", 0, 1, False) == "sample_0007"
    assert video_name(7, "x", 2, 3, False) == "sample_0007-2"
    assert video_name(7, "x", 0, 1, False, sample_name="clip") == "clip_0007"
    assert video_name(7, "a dog, running.", 0, 1, True) == "a dog, running.-0"  # VBench: {prompt}-{k}
    assert video_name(7, "a/b", 3, 5, True) == "a_b-3"
    long = video_name(0, "word " * 100, 1, 5, True)
    assert len(long.encode()) <= 222 and long.endswith("-1") and long != video_name(0, "word " * 99, 1, 5, True)


def test_batches_seed_and_order(tmp_path):
    cfg = tiny(tmp_path, "--prompt", *PROMPTS, "--batch-size", "2", "--num-sample", "2", "--seed", "10", "--aes", "6.5")
    batches = plan_batches(cfg, list(enumerate(PROMPTS)))
    assert [[(j.index, j.k, j.seed) for j in b] for b in batches] == [
        [(0, 0, 10), (1, 0, 10)],
        [(0, 1, 11), (1, 1, 11)],
        [(2, 0, 10)],
        [(2, 1, 11)],
    ]
    assert batches[0][0].text == PROMPTS[0] + " aesthetic score: 6.5." and batches[0][0].prompt == PROMPTS[0]
    assert batches[1][1].name == "sample_0001-1"


# ------------------------------------------------------------------------------------------- files
def test_atomic_path_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "v.mp4"
    with pytest.raises(KeyboardInterrupt), atomic_path(final) as tmp:
        tmp.write_bytes(b"half a video")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"ok")
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def _probe_many(folder: str) -> None:
    for _ in range(300):
        check_writable(folder)


@pytest.mark.slow
def test_save_dir_check_is_safe_when_ranks_run_it_together(tmp_path):
    # Data-parallel ranks all check the save folder at start-up; a shared probe file made one rank's
    # clean-up fail now and then (FileNotFoundError, exit 2 under torchrun).
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_probe_many, args=(str(tmp_path),)) for _ in range(2)]
    for proc in procs:
        proc.start()
    _probe_many(str(tmp_path))
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert list(tmp_path.iterdir()) == []


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
    dead, alive = tmp_path / ".a.mp4.111.tmp", tmp_path / f".b.mp4.{os.getpid()}.tmp"
    for p in (dead, alive, tmp_path / "c.mp4"):
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path, alive=lambda pid: pid == os.getpid()) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "c.mp4"]


@pytest.mark.parametrize("size", [(16, 24), (15, 17)])
def test_mp4_round_trip(tmp_path, size):
    frames = torch.randint(0, 255, (5, *size, 3), dtype=torch.uint8)
    codec = write_video(tmp_path / "v.mp4", frames, fps=8)
    decoded = decode(tmp_path / "v.mp4")
    assert codec in ("libx264", "h264", "mpeg4") and len(decoded) == 5 and decoded[0].shape == (*size, 3)
    with av.open(str(tmp_path / "v.mp4")) as c:
        assert c.streams.video[0].average_rate == 8


# ------------------------------------------------------------------------------------------- the pipeline
def test_steps_method_sets_the_sampler_steps(tmp_path):
    summary = pipeline.run(tiny(tmp_path, "--prompt", PROMPTS[0], "--cache", "steps", "--cache-opt", "num_steps=1"))
    record = json.loads((tmp_path / "out" / "sample_0000.json").read_text())
    assert summary.exit_code == 0 and record["steps"] == 1 and record["method_config"] == {"num_steps": 1}
    assert record["cache_bytes"] == 0 and record["method"] == "steps"


def test_no_flop_counter_runs_inside_the_timed_window(tmp_path, monkeypatch):
    # latency_s is the video's own time: the real sampling loop must run with no dispatch mode (FLOP counter)
    # active, and the FLOPs still get counted (after the window, on a meta copy).
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from duca_video.sampling.rflow import RFlowSampler

    real, modes = RFlowSampler.sample, []

    def spy(self, model, z, *args, **kwargs):
        if not z.is_meta:
            modes.append(_get_current_dispatch_mode())
        return real(self, model, z, *args, **kwargs)

    monkeypatch.setattr(RFlowSampler, "sample", spy)
    pipeline.run(tiny(tmp_path, "--prompt", *PROMPTS[:2], "--batch-size", "2", "--cache", "duca"))
    record = json.loads((tmp_path / "out" / "sample_0000.json").read_text())
    assert modes == [None] and record["dit_tflops"] > 0 and "after the timed run" in record["dit_tflops_counted_by"]


def test_dit_flops_of_the_real_run_match_the_meta_count(tmp_path):
    # The CPU attention kernel is unknown to torch's counter; without the pipeline's mapping it would count 0.
    from duca_video.metrics.flops import stdit3_forward_flops
    from duca_video.models import STDiT3Config
    from duca_video.testbed import WordTextEncoder

    cfg = tiny(tmp_path, "--prompt", PROMPTS[0], "--cache", "none")
    pipeline.run(cfg)
    record = json.loads((tmp_path / "out" / "sample_0000.json").read_text())
    if cfg.model.from_pretrained:  # the shipped testbed model: its config.json defines the architecture
        from duca_video.testbed.tiny import load_tiny, read_tiny_config

        arch, _ = read_tiny_config(cfg.model.from_pretrained)
        words = load_tiny(cfg.model.from_pretrained).text_encoder
    else:
        words = WordTextEncoder()  # the tiny config's encoder sets the caption size
        sizes = {"in_channels": 3, "caption_channels": words.output_dim, "model_max_length": words.model_max_length}
        arch = STDiT3Config.from_dict({**cfg.model.extra, **sizes})
    # Cross-attention attends to the caption's own tokens only (the sampler cuts the text keys to them).
    tokens = int(words.encode([PROMPTS[0]])["mask"].sum())
    assert tokens < arch.model_max_length
    per_step = stdit3_forward_flops(arch, (cfg.num_frames, 16, 16), (16, 16), batch=2, text_tokens=tokens)
    assert record["dit_tflops"] == pytest.approx(2 * per_step / 1e12, rel=1e-9)


def again_cfg_frames(tmp_path) -> int:
    return tiny(tmp_path).num_frames


FOUR = [*PROMPTS, "a small yellow square moving down on a dark background"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["duca", "toca", "toca:random_frame", "teacache", "fbcache", "auto", "none"])
def test_same_seed_same_video_in_any_batch(tmp_path, method):
    # With caching on, token selection is random: each video must draw it from its own seed, not from its
    # row in the batch (batch 4 puts the fourth prompt on row 3, batch 1 on row 0).
    method, _, selector = method.partition(":")
    flags = ["--prompt", *FOUR, "--save-latents", "--cache", method, "--num-sampling-steps", "8"]
    flags += ["--cache-opt", f"selector={selector}"] if selector else []
    pipeline.run(tiny(tmp_path / "a", *flags, "--batch-size", "4"))
    pipeline.run(tiny(tmp_path / "b", *flags, "--batch-size", "1"))
    for i in range(4):
        a = load_file(tmp_path / "a" / "out" / f"sample_{i:04d}.latent.safetensors")["latent"]
        b = load_file(tmp_path / "b" / "out" / f"sample_{i:04d}.latent.safetensors")["latent"]
        assert a.shape == (3, again_cfg_frames(tmp_path), 16, 16)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_batched_sampling_draws_each_videos_selection_from_its_own_seed():
    from duca_video import cache
    from duca_video.sampling.rflow import RFlowSampler
    from tests.helpers import tiny_model

    model = tiny_model()
    controller = cache.enable(model, "toca", selector="random")
    picks = []
    original = controller.selector.select

    def spy(*args, **kwargs):
        idx, pad = original(*args, **kwargs)
        picks.append(idx.clone())
        return idx, pad

    controller.selector.select = spy
    sampler = RFlowSampler(num_sampling_steps=6, cfg_scale=2.0, use_timestep_transform=False)
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(3, 4, 3, 8, 10, generator=g), torch.randn(3, 1, 8, 32, generator=g)
    kw = {"height": torch.full((3,), 64.0), "width": torch.full((3,), 80.0), "fps": torch.full((3,), 8.0)}
    y_null = model.y_embedder.y_embedding[None, None].expand_as(y)
    sampler.sample(model, z, y, y_null, None, model_kwargs=kw, progress=False, seed=[7, 8, 7])
    assert picks, "toca made no conservative step"
    for idx in picks:  # rows: cond 7, 8, 7 then null 7, 8, 7
        assert torch.equal(idx[0], idx[2]) and torch.equal(idx[0], idx[3]) and torch.equal(idx[1], idx[4])
        assert not torch.equal(idx[0], idx[1])
    cache.disable(model)


def test_a_prompt_that_fails_in_its_encoder_does_not_take_its_batch_down(tmp_path, monkeypatch):
    from duca_video.testbed import WordTextEncoder

    real = WordTextEncoder.encode

    def picky(self, prompts):  # e.g. T5 in strict mode refusing a prompt over its token limit
        if any("green" in p for p in prompts):
            raise ValueError("prompt 0 has 512 tokens; the limit is 300")
        return real(self, prompts)

    monkeypatch.setattr(WordTextEncoder, "encode", picky)
    summary = pipeline.run(tiny(tmp_path, "--prompt", *PROMPTS, "--batch-size", "3", "--save-latents"))
    assert summary.written == ["sample_0000", "sample_0001"] and summary.exit_code == 1
    assert summary.failed == [("sample_0002", "ValueError: prompt 0 has 512 tokens; the limit is 300")]


def test_a_failed_batch_is_recorded_and_the_job_goes_on(tmp_path, monkeypatch):
    real, calls = pipeline.generate, []

    def flaky(models, cfg, jobs, progress):
        calls.append([j.name for j in jobs])
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(models, cfg, jobs, progress)

    monkeypatch.setattr(pipeline, "generate", flaky)
    summary = pipeline.run(tiny(tmp_path, "--prompt", *PROMPTS, "--batch-size", "1"))
    out = tmp_path / "out"
    assert summary.failed == [("sample_0000", "RuntimeError: CUDA out of memory (injected)")]
    assert summary.written == ["sample_0001", "sample_0002"] and summary.exit_code == 1
    assert sorted(p.name for p in out.iterdir()) == [f"sample_000{i}.{e}" for i in (1, 2) for e in ("json", "mp4")]
    assert "FAILED sample_0000: RuntimeError: CUDA out of memory" in summary.format()
    # The next run only redoes the failed video.
    monkeypatch.setattr(pipeline, "generate", real)
    again = pipeline.run(tiny(tmp_path, "--prompt", *PROMPTS, "--batch-size", "1"))
    assert again.written == ["sample_0000"] and again.skipped == ["sample_0001", "sample_0002"]


def test_a_kill_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    real_replace, renamed = os.replace, []

    def killed_before_second_video(src, dst):
        if str(dst).endswith("sample_0001.mp4"):
            raise KeyboardInterrupt  # the process dies with the video complete under its temporary name only
        if ".write-probe" not in Path(dst).name:
            renamed.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_second_video)
    summary = pipeline.run(tiny(tmp_path, "--save-latents"))
    monkeypatch.setattr(os, "replace", real_replace)
    out = tmp_path / "out"
    assert summary.interrupted and summary.exit_code == 130 and summary.written == ["sample_0000"]
    assert renamed == [
        "sample_0000.latent.safetensors",
        "sample_0000.mp4",
        "sample_0000.json",
        "sample_0001.latent.safetensors",
    ]
    # sample_0001's latent was written but not its video: the stop removes it with the video's other files, so
    # the folder holds whole videos only (and the next run makes sample_0001 again).
    assert sorted(p.name for p in out.iterdir()) == sorted(renamed[:3])
    again = pipeline.run(tiny(tmp_path, "--save-latents"))
    assert again.skipped == ["sample_0000"] and again.written == ["sample_0001"]
    assert len(decode(out / "sample_0001.mp4")) == again_cfg_frames(tmp_path)


def test_complete_outputs_need_no_model(tmp_path, monkeypatch):
    assert pipeline.run(tiny(tmp_path)).written == ["sample_0000", "sample_0001"]

    def no_loading(*args, **kwargs):
        raise AssertionError("models loaded although every video is complete")

    monkeypatch.setattr(pipeline, "load_models", no_loading)
    summary = pipeline.run(tiny(tmp_path))
    assert summary.skipped == ["sample_0000", "sample_0001"] and summary.exit_code == 0
    assert "job: 2 of 2 video(s) complete on disk" in summary.format()


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--seed", "9"], "seed"),
        (["--num-sampling-steps", "3"], "scheduler.num_sampling_steps"),
        (["--cfg-scale", "2.5"], "scheduler.cfg_scale"),
        (["--cache", "toca"], "method"),
        (["--cache-opt", "recompute_ratio=0.3"], "method_config.recompute_ratio"),
        (["--fps", "4"], "fps"),
        (["--dtype", "bf16"], "dtype"),
        (["--prompt", PROMPTS[2], PROMPTS[1]], "prompt"),
    ],
)
def test_a_video_made_with_other_settings_is_refused_before_any_model_loads(tmp_path, monkeypatch, flags, field):
    pipeline.run(tiny(tmp_path))
    monkeypatch.setattr(pipeline, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    with pytest.raises(pipeline.InputError, match=r"sample_0000 \(.*" + field.replace(".", r"\.")) as err:
        pipeline.run(tiny(tmp_path, *flags))
    assert "--overwrite" in str(err.value)


def test_overwrite_regenerates_videos_made_with_other_settings(tmp_path):
    pipeline.run(tiny(tmp_path))
    summary = pipeline.run(tiny(tmp_path, "--seed", "9", "--overwrite"))
    assert summary.written == ["sample_0000", "sample_0001"]
    record = json.loads((tmp_path / "out" / "sample_0000.json").read_text())
    assert record["seed"] == 9 and record["identity"]["seed"] == 9
    assert pipeline.run(tiny(tmp_path, "--seed", "9")).skipped == ["sample_0000", "sample_0001"]


@pytest.mark.parametrize("damage", ["truncate", "empty", "replace", "delete_latent"])
def test_a_damaged_video_is_not_complete_and_is_made_again(tmp_path, damage):
    pipeline.run(tiny(tmp_path, "--save-latents"))
    out = tmp_path / "out"
    video = out / "sample_0001.mp4"
    data = video.read_bytes()
    if damage == "truncate":
        video.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        video.write_bytes(b"")
    elif damage == "replace":  # same size, other bytes: only the hash tells
        video.write_bytes(data[:-16] + bytes(16))
    else:
        (out / "sample_0001.latent.safetensors").unlink()
    summary = pipeline.run(tiny(tmp_path, "--save-latents"))
    assert summary.skipped == ["sample_0000"] and summary.written == ["sample_0001"]
    assert video.read_bytes() == data  # the same video again (same prompt, seed, settings)
    assert len(decode(video)) == again_cfg_frames(tmp_path)


def test_a_video_held_by_another_live_job_is_left_to_it(tmp_path):
    import subprocess
    import sys

    from duca_video.jobs.locks import lock_path

    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"pid": other.pid, "host": __import__("socket").gethostname(), "started": 0, "command": "other"}
        lock_path(out, "sample_0000").write_text(json.dumps(holder))
        summary = pipeline.run(tiny(tmp_path))
    finally:
        other.kill()
        other.wait()
    assert summary.written == ["sample_0001"] and [n for n, _ in summary.busy] == ["sample_0000"]
    assert summary.exit_code == 1 and "NOT DONE sample_0000: being generated by another job" in summary.format()
    assert not (out / "sample_0000.mp4").exists() and lock_path(out, "sample_0000").exists()
    # Its holder has gone now: the lock is stale, taken over, and released after writing.
    summary = pipeline.run(tiny(tmp_path))
    assert summary.written == ["sample_0000"] and not lock_path(out, "sample_0000").exists()


@pytest.mark.slow
def test_two_jobs_sharing_a_folder_never_leave_a_record_of_another_video(tmp_path):
    import hashlib
    import subprocess
    import sys

    script = str(ROOT / "scripts" / "inference.py")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(FOUR) + "\n")
    base = [
        sys.executable,
        script,
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        "--save-dir",
        str(tmp_path / "out"),
        "--prompt-path",
        str(prompts),
        "--num-sampling-steps",
        "4",
        "--batch-size",
        "1",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [
        subprocess.Popen([*base, "--cache", method], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for method in ("duca", "fora")
    ]
    results = [job.communicate(timeout=300) + (job.returncode,) for job in jobs]
    assert all(code in (0, 1, 2) for *_, code in results), results
    assert all("Traceback" not in err for _, err, _ in results), results
    records = sorted((tmp_path / "out").glob("sample_*.json"))
    assert len(records) == 4  # every video was made, by one job or the other
    for path in records:
        record = json.loads(path.read_text())
        video = path.with_suffix(".mp4")
        assert hashlib.sha256(video.read_bytes()).hexdigest() == record["video_sha256"], path.name
        assert record["method"] == record["identity"]["method"] in ("duca", "fora")
    assert not list((tmp_path / "out").glob(".*.lock"))


# ------------------------------------------------------------------------------------------- Open-Sora's components
@pytest.fixture(scope="module")
def opensora_weights(tmp_path_factory):
    """Tiny stand-ins with the real loaders' formats: a T5 folder, a combined VAE checkpoint, an STDiT3 folder."""
    pytest.importorskip("tokenizers")
    import json as json_lib

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from duca_video.models import OpenSoraVAE, STDiT3, STDiT3Config

    root = tmp_path_factory.mktemp("opensora")
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(PROMPTS, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    words.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(root / "t5")
    torch.manual_seed(0)
    t5 = T5Config(
        vocab_size=words.get_vocab_size(),
        d_model=32,
        d_kv=8,
        num_heads=4,
        num_layers=1,
        d_ff=64,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5EncoderModel(t5).save_pretrained(root / "t5")
    vae = OpenSoraVAE.from_config(VAE_SPATIAL, VAE_TEMPORAL)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, root / "vae.safetensors")
    arch = STDiT3Config(depth=1, hidden_size=32, num_heads=2, caption_channels=32, model_max_length=24)
    (root / "dit").mkdir()
    (root / "dit" / "config.json").write_text(json_lib.dumps(arch.to_dict()))
    save_file({k: v.contiguous() for k, v in STDiT3(arch).state_dict().items()}, root / "dit" / "model.safetensors")
    return root


VAE_SPATIAL = {"block_out_channels": (8, 16), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4}
VAE_TEMPORAL = {
    "filters": 8,
    "num_res_blocks": 1,
    "num_groups": 4,
    "channel_multipliers": (1, 2, 2, 4),
    "temporal_downsample": (False, True, True),
}


def test_opensora_components_from_environment_variables(tmp_path, monkeypatch, opensora_weights):
    config = tmp_path / "small_opensora.py"
    text = (ROOT / "configs" / "duca_480p.py").read_text()
    text = text.replace('resolution = "480p"', "image_size = (32, 48)").replace("num_frames = 51", "num_frames = 17")
    text = text.replace("model_max_length=300)", "model_max_length=24)")
    text = text.replace(
        "micro_batch_size=4)", f"micro_batch_size=4, spatial_config={VAE_SPATIAL!r}, temporal_config={VAE_TEMPORAL!r})"
    )
    config.write_text(text)
    monkeypatch.setenv("DUCA_CKPT_PATH", str(opensora_weights / "dit"))
    monkeypatch.setenv("DUCA_VAE_PATH", str(opensora_weights / "vae.safetensors"))
    monkeypatch.setenv("DUCA_T5_PATH", str(opensora_weights / "t5"))
    argv = [
        "--config",
        str(config),
        "--prompt",
        PROMPTS[0],
        "--save-dir",
        str(tmp_path / "out"),
        "--quiet",
        "--num-sampling-steps",
        "5",
        "--save-latents",
    ]
    summary = pipeline.run(load_config(config, build_parser().parse_args(argv)))
    assert summary.exit_code == 0, summary.format()
    record = json.loads((tmp_path / "out" / "sample_0000.json").read_text())
    assert record["text"] == PROMPTS[0] + " aesthetic score: 6.5." and record["dtype"] == "bfloat16"
    assert record["latent_shape"] == [4, 5, 16, 24] and record["video_size"] == [32, 48] and record["frames"] == 17
    assert record["weights"]["model"] == str(opensora_weights / "dit") and record["method"] == "duca"
    assert len(decode(tmp_path / "out" / "sample_0000.mp4")) == 17
    latent = load_file(tmp_path / "out" / "sample_0000.latent.safetensors")["latent"]
    assert latent.shape == (4, 5, 16, 24) and torch.isfinite(latent).all()


def test_tiny_config_with_trained_weights_is_a_one_line_switch(tmp_path):
    """The files scripts/train_tiny.py exports (config.json with extra metadata, model.safetensors, the word
    encoder's two files) load once `_weights` names their folder."""
    from safetensors.torch import save_file

    from duca_video.models import STDiT3, STDiT3Config
    from duca_video.testbed import WordTextEncoder

    weights = tmp_path / "weights"
    encoder = WordTextEncoder(output_dim=24, model_max_length=12)
    encoder.save_pretrained(weights)
    arch = STDiT3Config(
        depth=1,
        hidden_size=32,
        num_heads=2,
        in_channels=3,
        caption_channels=24,
        model_max_length=12,
        pred_sigma=False,
        input_sq_size=64,
    )
    (weights / "config.json").write_text(json.dumps({**arch.to_dict(), "testbed": {"fps": 8}}))
    save_file({k: v.contiguous() for k, v in STDiT3(arch).state_dict().items()}, weights / "model.safetensors")
    import re

    config = tmp_path / "tiny.py"
    text = (ROOT / "configs" / "tiny.py").read_text()
    line = re.compile(r"^_weights = .*$", re.MULTILINE)
    assert len(line.findall(text)) == 1
    for value, expected in ((repr(str(weights)), str(weights)), ("None", None)):  # trained weights, random init
        config.write_text(line.sub(f"_weights = {value}", text))
        out = tmp_path / f"out-{value[:4]}"
        argv = [
            "--config",
            str(config),
            "--prompt",
            PROMPTS[0],
            "--save-dir",
            str(out),
            "--quiet",
            "--num-sampling-steps",
            "2",
        ]
        assert pipeline.run(load_config(config, build_parser().parse_args(argv))).exit_code == 0
        record = json.loads((out / "sample_0000.json").read_text())
        if expected is not None:
            assert record["weights"] == {"model": expected, "vae": "PixelVAE", "text_encoder": expected}
        else:
            assert record["weights"]["model"].startswith("random init")


def test_testbed_settings_are_checked_against_the_constructors(tmp_path):
    from duca_video.configs import ConfigError, InferenceConfig

    cfg = InferenceConfig.from_dict(
        {
            "image_size": (16, 16),
            "num_frames": 8,
            "prompt": [PROMPTS[0]],
            "save_dir": str(tmp_path / "out"),
            "scheduler": {"use_timestep_transform": False},
            "model": {"type": "STDiT3"},
            "vae": {"type": "PixelVAE"},
            "text_encoder": {"type": "word", "colour": "red"},
        }
    )
    with pytest.raises(ConfigError, match="text_encoder: unknown key 'colour' for WordTextEncoder; allowed: words"):
        pipeline.run(cfg)
    with pytest.raises(ConfigError, match="vae.from_pretrained: PixelVAE has no weights"):
        pipeline.run(tiny(tmp_path, "--vae-path", str(tmp_path)))
