"""Every tool and evaluation script refuses bad arguments as the inference CLI does: exit status 2, one
`error: ...` line naming the flag, no traceback, and before any work (nothing printed on stdout, no output file
written). Each case runs the tool as its user does, in a subprocess; the cases run a few at a time, in one
module fixture, so the whole file takes about as long as its slowest few refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ["scripts/benchmark.py", "--config", "configs/bench_cpu.py", "--json", "{base}/bench.json"]
FLOPS_BENCH = [*BENCH, "--flops-only"]
TESTBED = ["scripts/benchmark.py", "--config", "configs/tiny.py", "--json", "{base}/bench.json"]
GPU = ["scripts/gpu_check.py", "--tiny", "--out", "{base}/gpu.json"]
MEMORY = ["-m", "duca_video.metrics.memory"]
SCALING = ["-m", "duca_video.metrics.scaling", "--published-only"]
FLOPS = ["-m", "duca_video.metrics.flops"]
PROBE = ["-m", "duca_video.models.sdpa_probe", "--resolution", "144p", "--frames", "17"]
CALIBRATE = [
    "-m",
    "duca_video.cache.methods.magcache_calibrate",
    "--config",
    "configs/tiny.py",
    "--prompts",
    "1",
    "--num-sampling-steps",
    "2",
]
FIDELITY = ["eval/fidelity.py", "--reference", "{base}/videos/none", "--methods", "a={base}/videos/a", "--lpips", "off"]
REPORT = ["eval/report.py", "--reference", "{base}/videos/none", "--methods", "a={base}/videos/a"]
OPENSORA = ["-m", "duca_video.opensora"]
SCRIPT = "{base}/checkout/scripts/inference.py"


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    expect: str  # in the error line: the flag (or the file) refused
    outputs: tuple[str, ...] = ()  # files (under the test's folder) that must not appear


CASES = [
    # scripts/benchmark.py: no value replaced by a default, every output checked before the work
    Case("bench-steps-0", [*FLOPS_BENCH, "--num-sampling-steps", "0"], "--num-sampling-steps", ("bench.json",)),
    Case("bench-methods-empty", [*FLOPS_BENCH, "--methods", ""], "--methods", ("bench.json",)),
    Case("bench-methods-comma", [*FLOPS_BENCH, "--methods", ","], "--methods", ("bench.json",)),
    Case("bench-repeats-0", [*BENCH, "--repeats", "0"], "--repeats", ("bench.json",)),
    Case("bench-threads-0", [*BENCH, "--threads", "0"], "--threads", ("bench.json",)),
    Case("bench-prompts-0", [*TESTBED, "--prompts", "0"], "--prompts", ("bench.json",)),
    Case("bench-sp-sizes-empty", [*FLOPS_BENCH, "--sp-sizes", ""], "--sp-sizes", ("bench.json",)),
    Case("bench-sp-sizes-3", [*FLOPS_BENCH, "--sp-sizes", "3"], "--sp-sizes", ("bench.json",)),
    Case(
        "bench-config-missing",
        ["scripts/benchmark.py", "--config", "{base}/none.py", "--json", "{base}/bench.json"],
        "--config",
        ("bench.json",),
    ),
    Case(
        "bench-json-folder",
        ["scripts/benchmark.py", "--config", "configs/bench_cpu.py", "--json", "{base}/folder", "--flops-only"],
        "--json",
    ),
    Case(
        "bench-json-under-file",
        [
            "scripts/benchmark.py",
            "--config",
            "configs/bench_cpu.py",
            "--json",
            "{base}/list.json/bench.json",
            "--flops-only",
        ],
        "--json",
    ),
    Case("bench-plot-no-folder", [*FLOPS_BENCH, "--plot", "{base}/missing/plot.png"], "--plot", ("bench.json",)),
    Case("bench-device", [*BENCH, "--device", "bogus"], "--device", ("bench.json",)),
    Case("bench-ckpt-missing", [*BENCH, "--ckpt-path", "{base}/missing"], "--ckpt-path", ("bench.json",)),
    Case("bench-mask-strategy-empty", [*TESTBED, "--mask-strategy", ""], "--mask-strategy", ("bench.json",)),
    Case("bench-testbed-flops-only", [*TESTBED, "--flops-only"], "--flops-only", ("bench.json",)),
    # scripts/gpu_check.py
    Case("gpu-steps-0", [*GPU, "--steps", "0"], "--steps", ("gpu.json",)),
    Case("gpu-text-tokens-0", [*GPU, "--text-tokens", "0"], "--text-tokens", ("gpu.json",)),
    Case("gpu-text-tokens-over", [*GPU, "--text-tokens", "9"], "--text-tokens", ("gpu.json",)),
    Case("gpu-out-no-folder", ["scripts/gpu_check.py", "--tiny", "--out", "{base}/missing/gpu.json"], "--out"),
    Case("gpu-out-folder", ["scripts/gpu_check.py", "--tiny", "--out", "{base}/folder"], "--out"),
    Case(
        "gpu-compile-backend-empty",
        [*GPU, "--compile", "none", "--compile-backend", ""],
        "--compile-backend",
        ("gpu.json",),
    ),
    # python -m duca_video.metrics.memory / scaling / flops
    Case("memory-steps-0", [*MEMORY, "--steps", "0"], "--steps"),
    Case("memory-frames-0", [*MEMORY, "--sizes", "480p:0"], "--sizes"),
    Case("scaling-tflops-nan", [*SCALING, "--tflops", "nan"], "--tflops"),
    Case("scaling-tflops-inf", [*SCALING, "--tflops", "inf"], "--tflops"),
    Case("scaling-nvlink-nan", [*SCALING, "--nvlink-gbps", "nan"], "--nvlink-gbps"),
    Case("scaling-steps-0", [*SCALING, "--steps", "0"], "--steps"),
    Case("scaling-frames-0", ["-m", "duca_video.metrics.scaling", "--num-frames", "0"], "--num-frames"),
    Case("scaling-methods-empty", ["-m", "duca_video.metrics.scaling", "--methods", ""], "--methods"),
    Case("scaling-json-no-folder", [*SCALING, "--json", "{base}/missing/s.json"], "--json"),
    Case("scaling-json-folder", [*SCALING, "--json", "{base}/folder"], "--json"),
    Case("scaling-kernel-times-list", [*SCALING, "--kernel-times", "{base}/list.json"], "--kernel-times"),
    Case("scaling-kernel-times-types", [*SCALING, "--kernel-times", "{base}/badtypes.json"], "--kernel-times"),
    Case("scaling-kernel-times-empty", [*SCALING, "--kernel-times", ""], "--kernel-times"),
    Case("flops-frames-0", [*FLOPS, "--num-frames", "0"], "--num-frames"),
    Case("flops-batch-0", [*FLOPS, "--batch", "0"], "--batch"),
    Case("flops-size-0", [*FLOPS, "--image-size", "0", "0"], "--image-size"),
    # python -m duca_video.models.sdpa_probe
    Case("probe-frames-0", ["-m", "duca_video.models.sdpa_probe", "--frames", "0"], "--frames"),
    Case("probe-rows-0", [*PROBE, "--rows", "0"], "--rows"),
    Case("probe-heads-0", [*PROBE, "--num-heads", "0"], "--num-heads"),
    Case("probe-trial-batch-0", [*PROBE, "--trial-batch", "0"], "--trial-batch"),
    Case("probe-device", [*PROBE, "--device", "bogus"], "--device"),
    Case("probe-json-no-folder", [*PROBE, "--json", "{base}/missing/p.json"], "--json"),
    # python -m duca_video.cache.methods.magcache_calibrate: --out checked before the samples run
    Case("calibrate-out-no-folder", [*CALIBRATE, "--out", "{base}/missing/m.json"], "--out"),
    Case("calibrate-out-folder", [*CALIBRATE, "--out", "{base}/folder"], "--out"),
    Case("calibrate-out-empty", [*CALIBRATE, "--out", ""], "--out"),
    # eval/fidelity.py and eval/report.py
    Case("fidelity-out-file", [*FIDELITY, "--out", "{base}/list.json"], "--out"),
    Case("fidelity-out-empty", [*FIDELITY, "--out", ""], "--out"),
    Case("fidelity-device-empty", [*FIDELITY, "--out", "{base}/fid", "--device", ""], "--device", ("fid",)),
    Case(
        "fidelity-record-cost-type",
        [
            "eval/fidelity.py",
            "--reference",
            "{base}/videos/none",
            "--methods",
            "a={base}/videos/badrec",
            "--out",
            "{base}/fid",
            "--lpips",
            "off",
        ],
        "latency_s",
        ("fid",),
    ),
    Case("report-out-no-folder", [*REPORT, "--out", "{base}/missing/r.md"], "--out"),
    Case("report-out-folder", [*REPORT, "--out", "{base}/folder"], "--out"),
    Case("report-out-empty", [*REPORT, "--out", ""], "--out"),
    Case("report-reference-name-empty", [*REPORT, "--reference-name", ""], "--reference-name"),
    Case("report-vbench-empty", [*REPORT, "--vbench", ""], "--vbench"),
    Case("report-vbench-type", [*REPORT, "--vbench", "a={base}/vbench_bad.json"], "total"),
    Case("report-fidelity-type", [*REPORT, "--fidelity", "{base}/badtypes.json"], "summary"),
    # python -m duca_video.opensora (a stand-in Open-Sora checkout: see _checkout)
    Case("opensora-script-missing", [*OPENSORA, "{base}/checkout/scripts/missing.py", "{base}/cfg.py"], "missing.py"),
    Case(
        "opensora-script-not-upstream",
        [*OPENSORA, "--open-sora-root", "{base}/checkout", "--script", "scripts/benchmark.py", "{base}/cfg.py"],
        "--script",
    ),
    Case(
        "opensora-leading-not-upstream",
        [*OPENSORA, "--open-sora-root", "{base}/checkout", "scripts/benchmark.py", "{base}/cfg.py"],
        "benchmark.py",
    ),
    Case("opensora-config-missing", [*OPENSORA, SCRIPT, "{base}/none.py", "--cache", "duca"], "none.py"),
    Case("opensora-config-folder", [*OPENSORA, SCRIPT, "{base}/folder", "--cache", "duca"], "folder"),
    Case("opensora-root-empty", [*OPENSORA, "--open-sora-root", "", "{base}/cfg.py"], "--open-sora-root ''"),
]

# A stand-in Open-Sora checkout: upstream's registry and config functions, a script that builds a (tiny) STDiT3
# and a sampler through them, as upstream's scripts/inference.py does.
CHECKOUT = {
    "opensora/__init__.py": "",
    "opensora/utils/__init__.py": "",
    "opensora/registry.py": """import types


def build_module(module, builder, **kwargs):
    if module["type"] == "tiny":
        from duca_video.models import STDiT3, STDiT3Config

        return STDiT3(STDiT3Config(depth=1, hidden_size=32, num_heads=2, caption_channels=8, model_max_length=4))
    return types.SimpleNamespace(num_sampling_steps=module["num_sampling_steps"], sample=lambda *a, **k: None)
""",
    "opensora/utils/config_utils.py": """import runpy
import sys


def read_config(path):
    return {k: v for k, v in runpy.run_path(path).items() if not k.startswith("_")}


def parse_configs(training=False):
    return read_config(sys.argv[1])
""",
    "scripts/inference.py": """from opensora.registry import build_module
from opensora.utils.config_utils import parse_configs

cfg = parse_configs()
model = build_module(cfg["model"], None)
scheduler = build_module(cfg["scheduler"], None)
print("script ran")
""",
}
CONFIG = 'model = dict(type="tiny")\nscheduler = dict(type="rflow", num_sampling_steps=10)\nseed = 1\n'


def _videos(base: Path) -> None:
    """Two folders of one tiny video each (NAME.mp4 + NAME.json that pair), and one whose record has a cost of
    the wrong type."""
    import torch

    from duca_video.io import write_video

    record = {
        "prompt": "p",
        "text": "p",
        "seed": 0,
        "image_size": [16, 16],
        "video_size": [16, 16],
        "frames": 4,
        "fps": 8,
    }
    for name, seed, latency in (("none", 0, 1.0), ("a", 1, 0.5), ("badrec", 1, "fast")):
        folder = base / "videos" / name
        folder.mkdir(parents=True)
        g = torch.Generator().manual_seed(seed)
        write_video(folder / "v0.mp4", torch.randint(20, 236, (4, 16, 16, 3), generator=g, dtype=torch.uint8), fps=8)
        (folder / "v0.json").write_text(json.dumps({**record, "latency_s": latency}))


def _fixtures(base: Path) -> None:
    (base / "folder").mkdir()
    (base / "list.json").write_text("[1, 2]")
    (base / "badtypes.json").write_text(
        json.dumps(
            {"device": "cpu", "setup": [1, 2], "summary": ["a"], "methods": {"none": {"step_ms": {"full": "x"}}}}
        )
    )
    (base / "vbench_bad.json").write_text(json.dumps({"total": "high", "quality": 80.0, "semantic": 70.0}))
    (base / "cfg.py").write_text(CONFIG)
    for rel, text in CHECKOUT.items():
        (base / "checkout" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "checkout" / rel).write_text(text)
    _videos(base)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPEN_SORA_ROOT"}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(argv: list[str], base: Path, timeout: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, *(a.format(base=base) for a in argv)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # a tool that started its work instead of refusing
        done = subprocess.CompletedProcess(cmd, -1, str(exc.stdout or ""), f"timed out: {exc}")
    return done, time.perf_counter() - start


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tool_args")
    _fixtures(path)
    return path


@pytest.fixture(scope="module")
def outcomes(request, base) -> dict[str, tuple[subprocess.CompletedProcess, float]]:
    """The selected cases, run a few at a time (each is a fresh interpreter that refuses at once)."""
    params = [getattr(item, "callspec", None) for item in request.session.items]
    chosen = {p.params["case"].id for p in params if p is not None and isinstance(p.params.get("case"), Case)}
    cases = [c for c in CASES if c.id in chosen]
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        done = list(pool.map(lambda c: _run(c.argv, base), cases))
    return {c.id: d for c, d in zip(cases, done)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_argument_is_one_error_line_exit_2_before_any_work(case, outcomes, base):
    done, seconds = outcomes[case.id]
    shown = f"{' '.join(done.args)}\nrc {done.returncode}\nstdout: {done.stdout[-1500:]}\nstderr: {done.stderr[-3000:]}"
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2, shown
    assert "Traceback" not in done.stderr, shown
    assert len(errors) == 1, shown
    assert case.expect in errors[0], shown
    # Refused before any work: nothing measured, printed or written.
    assert done.stdout == "", shown
    assert not [p for p in case.outputs if (base / p).exists()], shown
    assert not (base / "missing").exists(), shown
    assert seconds < 60, shown


def test_opensora_help_prints_our_flags(base):
    done, _ = _run([*OPENSORA, "--help"], base)
    assert done.returncode == 0, done.stderr
    for flag in ("--cache ", "--cache-opt", "--open-sora-root", "--script"):
        assert flag in done.stdout
    assert "error:" not in done.stderr


def test_opensora_cache_opt_with_the_method_in_the_config(base):
    # The README: the config may carry `cache = dict(method=...)`; --cache-opt then sets that method's fields.
    config = base / "cfg_cache.py"
    config.write_text(CONFIG + 'cache = dict(method="duca")\n')
    done, _ = _run([*OPENSORA, SCRIPT, str(config), "--cache-opt", "recompute_ratio=0.3"], base)
    assert done.returncode == 0, done.stderr
    assert "script ran" in done.stdout
    assert "cache 'duca' attached to STDiT3" in done.stderr and "'recompute_ratio': 0.3" in done.stderr
    # Without a method anywhere, --cache-opt is refused before anything is built.
    done, _ = _run([*OPENSORA, SCRIPT, "{base}/cfg.py", "--cache-opt", "recompute_ratio=0.3"], base)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and len(errors) == 1 and "--cache-opt needs --cache" in errors[0], done.stderr
    assert "script ran" not in done.stdout
