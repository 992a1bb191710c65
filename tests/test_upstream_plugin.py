"""The cache plugin on upstream Open-Sora v1.2.0's own STDiT3, driven by upstream's own RFLOW.sample.

Needs an Open-Sora checkout at $OPEN_SORA_ROOT (tag v1.2.0); skipped with the reason printed otherwise.
"""

import ast
from pathlib import Path

import pytest
import torch

from duca_video import cache
from duca_video.cache.follow import SamplingSettings, expected_timesteps
from duca_video.models import STDiT3, STDiT3Config
from tests.torchrun import run_workers, worker_env
from tests.upstream import (
    METHODS,
    TINY,
    sample_ours,
    sample_upstream,
    tiny_inputs,
    tiny_upstream_model,
    upstream_or_skip,
    upstream_rflow,
)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10


@pytest.fixture(scope="module")
def up():
    return upstream_or_skip()


@pytest.fixture(scope="module")
def models(up):
    theirs = tiny_upstream_model(up)
    ours = STDiT3(STDiT3Config(**TINY)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def kinds(controller) -> list[str]:
    return [h["kind"] for h in controller.history]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_under_upstreams_sampler_equals_ours(up, models, method):
    theirs, ours = models
    extra, data, rflow = METHODS[method], tiny_inputs(), upstream_rflow(up, STEPS)
    ctl_ours = cache.enable(ours, method, **extra)
    reference = sample_ours(ours, data, STEPS)  # our model, our sampler
    ctl_mixed = cache.enable(theirs, method, **extra)
    mixed = sample_ours(theirs, data, STEPS)  # upstream's model, our sampler
    ctl_theirs = cache.enable(theirs, method, scheduler=rflow, **extra)
    upstream = sample_upstream(rflow, theirs, data)  # upstream's model, upstream's sampler
    cache.disable(theirs)
    cache.disable(ours)
    print(
        f"{method}: ours vs upstream instance, our sampler {(mixed - reference).abs().max():.2e}, "
        f"upstream's sampler {(upstream - reference).abs().max():.2e}"
    )
    torch.testing.assert_close(mixed, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(upstream, reference, atol=1e-5, rtol=1e-5)
    assert kinds(ctl_theirs) == kinds(ctl_mixed) == kinds(ctl_ours) and len(kinds(ctl_theirs)) == STEPS
    assert ctl_theirs.cache_bytes == ctl_ours.cache_bytes
    assert [h["recomputed"] for h in ctl_theirs.history] == [h["recomputed"] for h in ctl_ours.history]
    if method != "none":  # it really cached: some step reused something
        assert set(kinds(ctl_theirs)) - {"full"} or any(h["spatial"] != "CCC" for h in ctl_theirs.history)
        assert ctl_theirs.cache_bytes > 0


def test_a_second_prompt_starts_clean_and_summary_describes_it(up, models):
    theirs, _ = models
    rflow = upstream_rflow(up, STEPS)
    first, second = tiny_inputs(seed=1), tiny_inputs(seed=2, frames=51)  # another size: other timesteps
    controller = cache.enable(theirs, "duca", scheduler=rflow)
    sample_upstream(rflow, theirs, first)
    after_first = sample_upstream(rflow, theirs, second)
    steps_seen = [h["t"] for h in controller.history]
    fresh = cache.enable(theirs, "duca", scheduler=rflow)
    alone = sample_upstream(rflow, theirs, second)
    cache.disable(theirs)
    torch.testing.assert_close(after_first, alone, atol=0, rtol=0)
    e = second["extra"]
    assert steps_seen == pytest.approx(
        expected_timesteps(
            SamplingSettings(STEPS, use_timestep_transform=True), e["height"], e["width"], e["num_frames"]
        )
    )
    assert [h["step"] for h in controller.history] == list(range(STEPS))
    lines = controller.summary().splitlines()
    assert len(lines) == STEPS + 3 and "conservative" in controller.summary()
    assert controller.cache_bytes == fresh.cache_bytes > 0


def test_disable_restores_upstreams_forward_bit_for_bit(up, models):
    theirs, _ = models
    rflow, data = upstream_rflow(up, STEPS), tiny_inputs()
    blocks = [*theirs.spatial_blocks, *theirs.temporal_blocks]
    reference = sample_upstream(rflow, theirs, data)
    cache.enable(theirs, "duca", scheduler=rflow)
    assert not torch.equal(sample_upstream(rflow, theirs, data), reference)
    cache.disable(theirs)
    assert torch.equal(sample_upstream(rflow, theirs, data), reference)
    assert not theirs._forward_pre_hooks and not theirs._forward_hooks and not theirs.fps_embedder._forward_hooks
    assert all("forward" not in m.__dict__ for b in blocks for m in (b, b.cross_attn))


def test_a_call_the_cache_cannot_place_is_an_error_naming_what_to_pass(up, models):
    theirs, _ = models
    rflow, data = upstream_rflow(up, STEPS), tiny_inputs()
    reference = sample_upstream(rflow, theirs, data)
    cache.enable(theirs, "duca")  # no sampler settings and upstream's sampler announces nothing
    with pytest.raises(RuntimeError, match=r"called outside a sample.*scheduler=.*num_sampling_steps="):
        sample_upstream(rflow, theirs, data)
    cache.enable(theirs, "duca", scheduler=upstream_rflow(up, 12))  # settings of another sampler
    with pytest.raises(RuntimeError, match=r"called at t=.*step 1 expects t=.*scheduler="):
        sample_upstream(rflow, theirs, data)
    no_transform = up.rf.RFLOW(num_sampling_steps=STEPS, cfg_scale=4.0)
    cache.enable(theirs, "duca", scheduler=no_transform)
    with pytest.raises(RuntimeError, match=r"step 1 expects"):
        sample_upstream(rflow, theirs, data)
    with pytest.raises(ValueError, match="'steps'.*num_sampling_steps"):
        cache.enable(theirs, "steps", scheduler=rflow)
    cache.enable(theirs, "none")  # nothing to cache: nothing to follow, upstream's result
    assert torch.equal(sample_upstream(rflow, theirs, data), reference)
    cache.disable(theirs)


def test_settings_as_a_dict_or_a_step_count_and_announcements_win(up, models):
    theirs, _ = models
    rflow, data = upstream_rflow(up, STEPS), tiny_inputs()
    cache.enable(theirs, "duca", scheduler=rflow)
    expected = sample_upstream(rflow, theirs, data)
    # Open-Sora's config entry, and the shorthand for its 1.2 inference sampler, give the same schedule.
    for settings in (
        {"scheduler": dict(type="rflow", use_timestep_transform=True, num_sampling_steps=STEPS)},
        {"num_sampling_steps": STEPS},
    ):
        cache.enable(theirs, "duca", **settings)
        assert torch.equal(sample_upstream(rflow, theirs, data), expected)
    # Our sampler announces its samples: settings given for another sampler do not get in the way.
    controller = cache.enable(theirs, "duca", scheduler=upstream_rflow(up, 25))
    ours = sample_ours(theirs, data, STEPS)
    cache.disable(theirs)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert len(controller.history) == STEPS


def test_followed_timesteps_are_upstreams_in_its_dtype(up):
    # Upstream builds height/width/num_frames in the model dtype: in bf16 its transform ratio is rounded.
    for dtype, (h, w, f) in ((torch.bfloat16, (480, 854, 51)), (torch.float32, (720, 1280, 102))):
        args = {k: torch.tensor([float(v)], dtype=dtype) for k, v in (("height", h), ("width", w), ("num_frames", f))}
        theirs = [
            up.rf.timestep_transform(torch.tensor([(1 - i / 30) * 1000]), args, num_timesteps=1000).item()
            for i in range(30)
        ]
        mine = expected_timesteps(SamplingSettings(30, use_timestep_transform=True), *args.values())
        assert mine == theirs


@pytest.mark.multiprocess
def test_upstream_sequence_parallel_on_two_ranks_equals_one_process(up, tmp_path):
    # Upstream's SP exchanges tokens with dist.all_to_all, which torch 2.3's gloo lacks (newer gloo has it).
    no_gloo = {
        "Backend gloo does not support alltoall": f"torch {torch.__version__}'s gloo backend has no all_to_all, "
        "which upstream's sequence parallelism uses: it runs on NCCL (a GPU) or on newer torch's gloo"
    }
    reports = run_workers(
        "upstream_sp_worker.py", 2, tmp_path, env=worker_env(OPEN_SORA_ROOT=str(up.root)), skip_if=no_gloo
    )
    for rank, report in enumerate(reports):
        for method, result in report["methods"].items():
            print(f"rank {rank} {method}: max |2 ranks - 1 process| = {result['max_diff']:.2e}")
            assert result["max_diff"] <= 1e-5, (rank, method, result["max_diff"])
            per_kind = {}
            for key, n in result["calls"].items():
                kind, collective = key.rsplit(":", 1)  # a kind may carry per-video bits
                per_kind.setdefault(kind, {})[collective] = n
            for kind in ("conservative", "aggressive"):  # cached steps: only upstream's own output all-gather
                if kind in result["history"]:
                    assert per_kind[kind] == {"all_gather": result["history"].count(kind)}, (method, per_kind)
            if method != "none":  # each rank holds the cache of its own tokens only
                assert 0 < result["cache_bytes"] < result["one_process_cache_bytes"]
        assert {"conservative", "aggressive"} <= set(report["methods"]["duca"]["history"])
        assert any(k.startswith(("aggressive", "mixed")) for k in report["methods"]["teacache"]["history"])


# -- python -m duca_video.opensora ------------------------------------------------------------------------------

DRIVER = ROOT / "tests" / "upstream_driver.py"


def write_config(tmp_path: Path, extra: str = "") -> Path:
    """An Open-Sora style inference config for the reduced script (tests/upstream_driver.py)."""
    path = tmp_path / "tiny_config.py"
    path.write_text(
        "seed = 42\nsave_dir = 'unused'\n"
        "model = dict(type='STDiT3-tiny-test', qk_norm=True)\n"
        "scheduler = dict(type='rflow', use_timestep_transform=True, num_sampling_steps=30, cfg_scale=4.0)\n" + extra
    )
    return path


def run_cli(up, tmp_path, *args, config_extra=""):
    from duca_video.opensora import main

    out = tmp_path / "out"
    argv = [
        "--open-sora-root",
        str(up.root),
        "--script",
        str(DRIVER),
        str(write_config(tmp_path, config_extra)),
        "--prompt",
        "a",
        "b",
        "--save-dir",
        str(out),
        "--num-sampling-steps",
        str(STEPS),
        *args,
    ]
    code = main(argv)
    return code, (torch.load(out / "latent.pt") if code == 0 else None)


def test_cli_attaches_the_cache_to_the_model_upstreams_script_builds(up, models, tmp_path, capsys):
    theirs, _ = models
    rflow, data = upstream_rflow(up, STEPS), tiny_inputs()
    cache.enable(theirs, "duca", scheduler=rflow, seed=42, recompute_ratio=0.25)
    expected = sample_upstream(rflow, theirs, data)
    cache.disable(theirs)
    plain = sample_upstream(rflow, theirs, data)

    code, latent = run_cli(up, tmp_path, "--cache", "duca", "--cache-opt", "recompute_ratio=0.25")
    assert code == 0 and torch.equal(latent, expected)
    err = capsys.readouterr().err
    assert "cache 'duca' attached to STDiT3 for RFLOW (10 steps)" in err and "conservative" in err
    # The config's own `cache` entry; the flag wins over its method.
    code, latent = run_cli(up, tmp_path, config_extra="cache = dict(method='duca', recompute_ratio=0.25)\n")
    assert code == 0 and torch.equal(latent, expected)
    code, latent = run_cli(up, tmp_path, "--cache", "none", config_extra="cache = dict(method='duca')\n")
    assert code == 0 and torch.equal(latent, plain)
    code, latent = run_cli(up, tmp_path)  # no cache asked for: upstream's script as it is
    assert code == 0 and torch.equal(latent, plain)
    code, _ = run_cli(up, tmp_path, "--cache", "steps", "--cache-opt", "num_steps=4")
    assert code == 0 and "for RFLOW (4 steps)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cache", "dcua"], "error: cache: unknown cache method 'dcua'"),
        (["--cache", "duca", "--cache-opt", "cylce=4"], "error: cache: cache method 'duca' has no field(s) ['cylce']"),
        (["--cache-opt", "recompute_ratio=0.2"], "error: --cache-opt needs --cache METHOD"),
        (
            ["--cache", "duca", "--open-sora-root", "/nonexistent"],
            "error: --open-sora-root=/nonexistent: not an Open-Sora",
        ),
    ],
)
def test_cli_bad_input_is_one_error_line_and_exit_2(up, tmp_path, capsys, args, message):
    code, _ = run_cli(up, tmp_path, *args)
    assert code == 2
    assert capsys.readouterr().err.startswith(message)


def test_cli_refuses_a_run_it_could_not_attach_to(up, tmp_path, capsys):
    script = tmp_path / "no_sampler.py"
    script.write_text(
        "from opensora.registry import SCHEDULERS, build_module\nbuild_module(dict(type='rflow'), SCHEDULERS)\n"
    )
    from duca_video.opensora import main

    assert main(["--open-sora-root", str(up.root), "--script", str(script), "--cache", "duca"]) == 2
    assert "the script built no STDiT3 model through opensora.registry.build_module" in capsys.readouterr().err


def test_upstreams_inference_script_builds_through_the_functions_the_cli_wraps(up):
    # The reduced script above stands in for scripts/inference.py, which needs T5 and VAE weights to run; this
    # checks that the real script takes its model, sampler and config through the names the CLI wraps.
    tree = ast.parse((up.root / "scripts" / "inference.py").read_text())
    imported = {
        (node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert {("opensora.registry", "build_module"), ("opensora.utils.config_utils", "parse_configs")} <= imported
    calls = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert any(c.startswith("build_module(cfg.model, MODELS") for c in calls)
    assert "build_module(cfg.scheduler, SCHEDULERS)" in calls
    assert any(c.startswith("scheduler.sample(model, text_encoder") for c in calls)


def test_follows_upstreams_bf16_inference(up):
    # As upstream's scripts/inference.py: model and size arguments in bf16 (854 becomes 856), 480p timesteps.
    model = tiny_upstream_model(up).to(torch.bfloat16)
    data = tiny_inputs(frames=51)
    data["z"] = data["z"].to(torch.bfloat16)
    data["extra"] = {
        k: torch.full((2,), v, dtype=torch.bfloat16)
        for k, v in (("height", 480.0), ("width", 854.0), ("num_frames", 51.0), ("fps", 24.0))
    }
    rflow = upstream_rflow(up, STEPS)
    seen = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(float(args[1][0])))
    controller = cache.enable(model, "duca", scheduler=rflow)
    out = sample_upstream(rflow, model, data)
    handle.remove()
    cache.disable(model)
    assert torch.isfinite(out).all()
    assert [h["t"] for h in controller.history] == seen and len(seen) == STEPS
    assert {"conservative", "aggressive"} <= set(kinds(controller))


@pytest.mark.parametrize("method", ["duca", "toca", "teacache"])
def test_following_forward_calls_equals_announced_sampling_without_upstream(method):
    # Runs without a checkout: our own sampler, once announcing its samples and once silent (its listener
    # removed, as for a sampler that announces nothing), on our STDiT3.
    from duca_video.sampling.events import unregister_listener
    from duca_video.sampling.rflow import RFlowSampler

    torch.manual_seed(0)
    model = STDiT3(STDiT3Config(**TINY)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    data, extra = tiny_inputs(), METHODS[method]
    announced = cache.enable(model, method, **extra)
    expected = sample_ours(model, data, STEPS)
    sampler = RFlowSampler(num_sampling_steps=STEPS, cfg_scale=4.0)
    followed = cache.enable(model, method, scheduler=sampler, **extra)
    unregister_listener(model, followed)
    out = sample_ours(model, data, STEPS)
    twice = sample_ours(model, data, STEPS)
    cache.disable(model)
    assert torch.equal(out, expected) and torch.equal(twice, expected)
    assert kinds(followed) == kinds(announced) and followed.cache_bytes == announced.cache_bytes > 0
    silent = cache.enable(model, method, **extra)
    unregister_listener(model, silent)
    with pytest.raises(RuntimeError, match="scheduler="):
        sample_ours(model, data, STEPS)
    cache.disable(model)
