"""The VBench protocol keeps no partial or stale score: a dimension is scored only when its result is finite and
covers every video the suite lists for it (score.py reruns it, tabulate.py refuses it unless --allow-partial);
score.py --device cpu; offline files; README commands; bad arguments and closed pipes. The scripts run as
subprocesses on result files in VBench 0.1.5's own format (vbench/__init__.py `evaluate`: NAME_full_info.json,
then NAME_eval_results.json = {dimension: [aggregate, [{"video_path", "video_results", ...}]]})."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from eval.vbench import generate, score, tabulate
from eval.vbench.protocol import AUXILIARY_KEYS, CPU_DIMENSIONS, DIMENSIONS, HF_MODELS, LOCAL_FILES, TORCH_HUB_FILES
from eval.vbench.results import write_suite_record

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {name: ROOT / "eval" / "vbench" / f"{name}.py" for name in ("generate", "score", "tabulate")}
N = 2  # videos per prompt in these suites


def run(script, *argv, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, str(SCRIPTS[script]), *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def make_suite(path, dims=DIMENSIONS):
    """A VBench_full_info.json with one prompt per dimension (and its auxiliary_info where VBench reads one)."""
    entries = []
    for dim in dims:
        entry = {"prompt_en": f"a prompt for {dim}", "dimension": [dim]}
        if dim in AUXILIARY_KEYS:
            entry["auxiliary_info"] = {dim: {AUXILIARY_KEYS[dim]: "red"}}
        entries.append(entry)
    path.write_text(json.dumps(entries, indent=4))
    return path


def suite_names(dim):
    return [f"a prompt for {dim}-{k}" for k in range(N)]


def write_vbench_result(score_dir, dim, aggregate, names, given=None):
    """What `VBench.evaluate(videos, name=dim, dimension_list=[dim])` writes: DIM_full_info.json first (the suite's
    entries for dim, each with the video_list found), then DIM_eval_results.json (json of (aggregate, results))."""
    view = score_dir / "videos"
    suite = [e for e in json.loads((score_dir.parent / "full_info.json").read_text()) if dim in e["dimension"]]
    for entry in suite:
        entry["video_list"] = [str(view / f"{n}.mp4") for n in (given if given is not None else names)]
    (score_dir / f"{dim}_full_info.json").write_text(json.dumps(suite, indent=4))
    rows = [{"video_path": str(view / f"{n}.mp4"), "video_results": aggregate} for n in names]
    (score_dir / f"{dim}_eval_results.json").write_text(json.dumps({dim: [aggregate, rows]}, indent=4))


@pytest.fixture
def layout(tmp_path):
    """tmp/full_info.json (all 16 dimensions), tmp/videos/{prompt}-{k}.mp4, tmp/scores/ with complete results."""
    make_suite(tmp_path / "full_info.json")
    videos, scores = tmp_path / "videos", tmp_path / "scores"
    videos.mkdir()
    scores.mkdir()
    for dim in DIMENSIONS:
        for name in suite_names(dim):
            (videos / f"{name}.mp4").write_bytes(b"")
        write_vbench_result(scores, dim, 0.9, suite_names(dim))
    return tmp_path


def workers(out):
    return sorted(line.split("--dimension ")[1].split()[0] for line in out.splitlines() if "--worker" in line)


# ---------------------------------------------------------------------------------------------------- score.py
def test_a_rerun_scores_again_a_partial_nan_or_other_suite_dimension(layout):
    scores = layout / "scores"
    write_vbench_result(scores, "temporal_flickering", 0.97, suite_names("temporal_flickering")[:1])  # 1 of 2
    write_vbench_result(scores, "subject_consistency", float("nan"), suite_names("subject_consistency"))
    write_vbench_result(scores, "scene", 0.5, [*suite_names("scene"), "another prompt-0"])  # another suite's
    # color lists only the videos where GRiT found the object: covered by the videos its run was given
    write_vbench_result(scores, "color", 0.4, suite_names("color")[:1], given=suite_names("color"))
    out = run(
        "score",
        "--videos",
        layout / "videos",
        "--score-dir",
        scores,
        "--full-info",
        layout / "full_info.json",
        "--num-samples",
        N,
        "--dry-run",
    )
    assert out.returncode == 0, out.stderr
    assert workers(out.stdout) == ["scene", "subject_consistency", "temporal_flickering"]
    assert (
        "re-scoring temporal_flickering: its results cover 1 of the 2 videos the suite lists for it, e.g. no "
        "result for 'a prompt for temporal_flickering-1.mp4'"
    ) in out.stdout
    assert "re-scoring subject_consistency: its score is nan, not a finite fraction" in out.stdout
    assert "re-scoring scene: its results hold 1 video(s) the suite does not list for it" in out.stdout
    assert "color" in out.stdout.split("already scored (skipped; --force to redo): ")[1].splitlines()[0]

    (scores / "color_full_info.json").unlink()  # now the color result's coverage cannot be read
    out = run(
        "score",
        "--videos",
        layout / "videos",
        "--score-dir",
        scores,
        "--full-info",
        layout / "full_info.json",
        "--num-samples",
        N,
        "--dry-run",
        "--dimensions",
        "color,dynamic_degree",
    )
    assert workers(out.stdout) == ["color"] and "re-scoring color: its results cover 1 of the 2" in out.stdout


def test_device_cpu_runs_the_cpu_dimensions_on_the_cpu(layout):
    base = [
        "--videos",
        layout / "videos",
        "--score-dir",
        layout / "s",
        "--full-info",
        layout / "full_info.json",
        "--num-samples",
        N,
        "--dry-run",
    ]
    out = run("score", *base, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines() if "--worker" in line]
    assert workers(out.stdout) == sorted(CPU_DIMENSIONS) and "aesthetic_quality" not in CPU_DIMENSIONS
    assert all(c.startswith("CUDA_VISIBLE_DEVICES='' ") and "--device cpu" in c for c in commands)
    assert "# cpu, one after another:" in out.stdout
    refused = run("score", *base, "--device", "cpu", "--dimensions", "temporal_flickering,aesthetic_quality")
    assert refused.returncode == 2 and refused.stderr.startswith("error: --device cpu: aesthetic_quality needs CUDA")
    helptext = " ".join(run("score", "--help").stdout.split())
    assert "cpu: one after another on the CPU" in helptext and "temporal_flickering" in helptext
    default = run("score", *base)
    assert all("--device cuda" in c for c in default.stdout.splitlines() if "--worker" in c)


def test_local_dry_run_lists_every_offline_file(layout):
    caches = layout / "caches"
    env = {
        **os.environ,
        "VBENCH_CACHE_DIR": str(caches / "vbench"),
        "TORCH_HOME": str(caches / "torch"),
        "HF_HOME": str(caches / "hf"),
    }
    for var in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(var, None)
    argv = [
        "--videos",
        layout / "videos",
        "--score-dir",
        layout / "s",
        "--full-info",
        layout / "full_info.json",
        "--num-samples",
        N,
        "--dry-run",
        "--local",
        "--force",
        "--dimensions",
        "subject_consistency,scene,color",
    ]
    missing = [line for line in run("score", *argv, env=env).stdout.splitlines() if "missing" in line]
    assert any(line.endswith("torch/hub/checkpoints/dino_vitbase16_pretrain.pth") for line in missing)
    assert any("hf/hub/models--bert-base-uncased" in line for line in missing)
    # every file in place (the check is existence): nothing is reported
    for rel in (
        "vbench/dino_model/dino_vitbase16_pretrain.pth",
        "vbench/caption_model/tag2text_swin_14m.pth",
        "vbench/grit_model/grit_b_densecap_objectdet.pth",
        "torch/hub/checkpoints/dino_vitbase16_pretrain.pth",
        "hf/hub/models--bert-base-uncased/snapshots/abc/config.json",
        "hf/hub/models--bert-base-uncased/snapshots/abc/vocab.txt",
        "hf/hub/models--bert-base-uncased/snapshots/abc/model.safetensors",
    ):
        (caches / rel).parent.mkdir(parents=True, exist_ok=True)
        (caches / rel).write_bytes(b"")
    (caches / "vbench/dino_model/facebookresearch_dino_main").mkdir()
    (caches / "hf/hub/models--bert-base-uncased/refs").mkdir()
    (caches / "hf/hub/models--bert-base-uncased/refs/main").write_text("abc")
    out = run("score", *argv, env=env)
    assert out.returncode == 0 and "missing" not in out.stdout, out.stdout


# ---------------------------------------------------------------------------------------------------- tabulate.py
def test_tabulate_refuses_a_dimension_scored_on_fewer_videos(layout):
    scores = layout / "scores"
    write_vbench_result(scores, "temporal_flickering", 0.9461, suite_names("temporal_flickering")[:1])
    write_suite_record(scores, layout / "full_info.json", N)  # as score.py leaves it: the suite of the results
    out = run("tabulate", "--score-dir", scores)
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1, out
    assert out.stderr.startswith(
        "error: dimension(s) scored on fewer videos than the suite lists: "
        "'temporal_flickering' on 1 of the 2 videos the suite lists for it"
    )
    assert not (scores / "scaled_results.json").exists()
    # the same from the suite given on the command line
    (scores / "suite.json").unlink()
    given = run("tabulate", "--score-dir", scores, "--full-info", layout / "full_info.json", "--num-samples", N)
    assert given.returncode == 2 and given.stderr == out.stderr
    write_suite_record(scores, layout / "full_info.json", N)

    allowed = run("tabulate", "--score-dir", scores, "--allow-partial")
    assert allowed.returncode == 0, allowed.stderr
    assert "| temporal_flickering | 94.61 (partial: 1 of 2 videos) |" in allowed.stdout
    scaled = json.loads((scores / "scaled_results.json").read_text())
    assert scaled["partial"] == {"temporal_flickering": {"videos": 1, "suite": 2}} and scaled["complete"] is False
    assert scaled["total"] is None and scaled["quality"] is None and scaled["semantic"] is not None

    write_vbench_result(scores, "temporal_flickering", 0.9461, suite_names("temporal_flickering"))
    complete = run("tabulate", "--score-dir", scores)
    assert complete.returncode == 0 and "partial" not in complete.stdout and complete.stderr == ""
    assert json.loads((scores / "scaled_results.json").read_text())["complete"] is True


# ---------------------------------------------------------------------------------------------------- README
def test_documented_commands_have_every_required_argument():
    section = (ROOT / "docs" / "evaluation.md").read_text()
    block = section.split("```bash")[1].split("```")[0].replace("\\\n", " ")
    code = (line.split("#")[0] for line in block.splitlines())
    commands = [shlex.split(c) for c in code if "eval/vbench/" in c]
    assert {Path(c[1]).stem for c in commands} >= {"generate", "score", "tabulate"}
    for argv in commands:
        name, args = Path(argv[1]).stem, argv[2:]
        parser = {"generate": generate, "score": score, "tabulate": tabulate}[name].build_parser()
        parsed = parser.parse_known_args(args)[0] if name == "generate" else parser.parse_args(args)
        if name in ("generate", "tabulate"):  # duca_video's environment: no vbench package to find the suite in
            assert parsed.full_info, f"{name}: {argv}"


def test_docs_list_every_file_each_dimension_reads_offline():
    rows = [r for r in (ROOT / "eval/vbench/README.md").read_text().splitlines() if r.startswith("| ")]
    for dim in DIMENSIONS:
        row = " ".join(r for r in rows if re.search(rf"\b{dim}\b", r.split("|")[1]))
        for item in (*LOCAL_FILES[dim], *TORCH_HUB_FILES.get(dim, ()), *HF_MODELS.get(dim, ())):
            assert item in row, (dim, item)


# ---------------------------------------------------------------------------------------------------- bad input
def bad_cases(tmp):
    fi, videos, scores = tmp / "full_info.json", tmp / "videos", tmp / "scores"
    score_args = ["--videos", videos, "--score-dir", tmp / "new", "--full-info", fi, "--num-samples", N]
    (tmp / "afile").write_text("x")
    (tmp / "view" / "videos").mkdir(parents=True)
    (tmp / "view" / "videos" / "not-a-link.mp4").write_bytes(b"")  # left by hand: VBench must see videos only
    (tmp / "nested.json").write_text(json.dumps([{"prompt_en": "a", "dimension": [["color"]]}]))
    (tmp / "aux.json").write_text(json.dumps([{"prompt_en": "a", "dimension": ["color"], "auxiliary_info": "red"}]))
    return [
        ("generate", ["--full-info", fi, "--list", "--num-samples", "nan"], "expected a whole number >= 1, got 'nan'"),
        ("generate", ["--full-info", "", "--list"], "argument --full-info: must not be empty"),
        ("generate", ["--full-info", tmp / "nested.json", "--list"], "field 'dimension' must be a non-empty list"),
        ("generate", ["--full-info", tmp / "aux.json", "--list"], "field 'auxiliary_info' must be an object"),
        (
            "generate",
            [
                "--full-info",
                fi,
                "--num-samples",
                1,
                "--config",
                ROOT / "configs/tiny.py",
                "--manifest",
                tmp,
                "--save-dir",
                tmp / "new",
            ],
            "is a folder, not a file",
        ),
        ("score", [*score_args, "--videos", ""], "argument --videos: must not be empty"),
        ("score", [*score_args, "--score-dir", "", "--dry-run"], "argument --score-dir: must not be empty"),
        ("score", [*score_args, "--score-dir", tmp / "afile", "--dry-run"], "is a file, not a folder"),
        ("score", [*score_args, "--score-dir", tmp / "view"], "which is not a link made by score.py"),
        ("score", [*score_args, "--gpus", "-1", "--dry-run"], "--gpus: '-1' is not a device number"),
        ("score", [*score_args, "--gpus", "nan", "--dry-run"], "--gpus: 'nan' is not a device number"),
        ("score", [*score_args, "--dimensions", "", "--dry-run"], "argument --dimensions: must not be empty"),
        ("score", [*score_args, "--full-info", "", "--dry-run"], "argument --full-info: must not be empty"),
        ("score", [*score_args, "--num-samples", "nan", "--dry-run"], "expected a whole number >= 1, got 'nan'"),
        ("score", [*score_args, "--python", tmp / "no-python", "--dry-run"], "is not an executable"),
        ("tabulate", ["--score-dir", scores, "--out", ""], "argument --out: must not be empty"),
        ("tabulate", ["--score-dir", scores, "--out", tmp / "afile"], "is a file, not a folder"),
        ("tabulate", ["--score-dir", ""], "argument --score-dir: must not be empty"),
        ("tabulate", ["--score-dir", scores, "--num-samples", "-1"], "expected a whole number >= 1, got '-1'"),
    ]


def test_bad_arguments_exit_2_with_one_error_line_before_any_work(layout):
    for script, argv, message in bad_cases(layout):
        created = sorted(layout.rglob("*"))
        out = run(script, *argv, cwd=layout)
        assert out.returncode == 2, (script, argv, out.stderr)
        assert out.stdout == "" and len(out.stderr.splitlines()) == 1 and out.stderr.startswith("error: "), out
        assert message in out.stderr, (script, argv, out.stderr)
        assert sorted(layout.rglob("*")) == created, (script, argv)  # nothing written, no folder made


@pytest.mark.parametrize("value", [[0.5, "x"], [0.5, [5]], [0.5, [{"video_path": 3}]], [0.5, [{}]], [0.5]])
def test_malformed_results_fields_are_an_error(layout, value):
    (layout / "scores" / "color_eval_results.json").write_text(json.dumps({"color": value}))
    out = run("tabulate", "--score-dir", layout / "scores")
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1, out
    assert out.stderr.startswith("error: ") and "color_eval_results.json': field 'color'" in out.stderr


# ---------------------------------------------------------------------------------------------------- closed pipe
def test_a_closed_pipe_is_not_a_traceback(layout):
    big = layout / "big.json"  # ~1 MB of names: more than a pipe holds
    big.write_text(
        json.dumps(
            [
                {
                    "prompt_en": f"prompt {i} " + "x" * 80,
                    "dimension": ["color"],
                    "auxiliary_info": {"color": {"color": "red"}},
                }
                for i in range(2000)
            ]
        )
    )
    for script, argv in [
        ("generate", ["--full-info", big, "--list"]),
        (
            "score",
            [
                "--videos",
                layout / "videos",
                "--score-dir",
                layout / "s",
                "--full-info",
                layout / "full_info.json",
                "--num-samples",
                N,
                "--dry-run",
                "--force",
            ],
        ),
        ("tabulate", ["--score-dir", layout / "scores", "--full-info", layout / "full_info.json", "--num-samples", N]),
    ]:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS[script]), *map(str, argv)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc.stdout.close()  # the reader is gone before anything is written (`| head -0`)
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 0 and err == "", (script, err)


# ---------------------------------------------------------------------------------------------------- real VBench
def test_temporal_flickering_on_cpu_with_the_real_vbench(tmp_path):
    if importlib.util.find_spec("vbench") is None or importlib.util.find_spec("cv2") is None:
        reason = "the vbench package (and its opencv) is not installed in this environment (eval/vbench/README.md)"
        print(f"skipped: {reason}")
        pytest.skip(reason)
    import cv2
    import numpy as np

    make_suite(tmp_path / "full_info.json", ["temporal_flickering"])
    videos, scores = tmp_path / "videos", tmp_path / "scores"
    videos.mkdir()
    for k, name in enumerate(suite_names("temporal_flickering")):
        writer = cv2.VideoWriter(str(videos / f"{name}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (32, 32))
        for t in range(8):
            writer.write(np.full((32, 32, 3), 40 + 10 * k + (5 * t) % 15, np.uint8))
        writer.release()
    argv = [
        "--videos",
        videos,
        "--score-dir",
        scores,
        "--full-info",
        tmp_path / "full_info.json",
        "--num-samples",
        N,
        "--device",
        "cpu",
        "--dimensions",
        "temporal_flickering",
    ]
    first = run("score", *argv)
    assert first.returncode == 0, first.stdout + first.stderr + (scores / "logs/temporal_flickering.log").read_text()
    data = json.loads((scores / "temporal_flickering_eval_results.json").read_text())["temporal_flickering"]
    assert 0.9 < data[0] <= 1.0 and len(data[1]) == N
    assert "already scored (skipped" in run("score", *argv).stdout
    data[1] = data[1][:1]  # as if the run had read one video only
    (scores / "temporal_flickering_eval_results.json").write_text(json.dumps({"temporal_flickering": data}))
    partial = run("tabulate", "--score-dir", scores, "--allow-missing")
    assert partial.returncode == 2 and "'temporal_flickering' on 1 of the 2 videos" in partial.stderr
    again = run("score", *argv)
    assert again.returncode == 0 and "re-scoring temporal_flickering: its results cover 1 of the 2" in again.stdout
    assert run("tabulate", "--score-dir", scores, "--allow-missing").returncode == 0
