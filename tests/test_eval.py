"""The VBench protocol tools: suite names and seeds, shards, --list without models, resumable generation with the
tiny CPU model, the scoring orchestrator's dry run, tabulation, and the comparison report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.common import EvalError, compare_costs, parse_named_paths
from eval.report import build_rows
from eval.report import main as report_main
from eval.vbench import generate, score, tabulate
from eval.vbench.protocol import (
    DIMENSIONS,
    Shard,
    load_suite,
    parse_shard,
    plan_videos,
    select_shard,
    video_name,
)

ROOT = Path(__file__).resolve().parents[1]
RED = "a large red square moving left on a dark background"
BLUE = "a small blue circle moving up on a light background"


@pytest.fixture
def full_info(tmp_path):
    """The structure of VBench_full_info.json, with testbed prompts: the first prompt is listed twice."""
    entries = [
        {"prompt_en": RED, "dimension": ["subject_consistency", "dynamic_degree"]},
        {"prompt_en": BLUE, "dimension": ["color"], "auxiliary_info": {"color": {"color": "blue"}}},
        {"prompt_en": RED, "dimension": ["aesthetic_quality"]},
    ]
    path = tmp_path / "full_info.json"
    path.write_text(json.dumps(entries))
    return path


# ---------------------------------------------------------------------------------------------------- the suite
def test_names_seeds_and_duplicates(full_info):
    videos = plan_videos(load_suite(full_info), num_samples=3, base_seed=1024)
    assert [v.name for v in videos] == [f"{RED}-0", f"{RED}-1", f"{RED}-2", f"{BLUE}-0", f"{BLUE}-1", f"{BLUE}-2"]
    assert [v.seed for v in videos] == [1024, 1025, 1026] * 2  # seed + k, the same for every prompt
    assert videos[0].prompt_index == 0 and videos[3].prompt_index == 1  # first entry of the prompt
    assert videos[0].dimensions == ("subject_consistency", "dynamic_degree", "aesthetic_quality")


def test_the_real_suite(reference):
    path = reference / "vbench_full_info.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    entries = load_suite(path)
    videos = plan_videos(entries, num_samples=5, base_seed=0)
    assert len(entries) == 946 and len({e.prompt for e in entries}) == 944
    assert len(videos) == len({v.name for v in videos}) == 4720
    assert {v.name.rsplit("-", 1)[1] for v in videos} == {"0", "1", "2", "3", "4"}
    assert all(v.seed == v.k for v in videos)
    assert max(len(v.name.encode()) for v in videos) == 212  # not truncated: VBench looks for the exact name
    assert {d for v in videos for d in v.dimensions} == set(DIMENSIONS)


def test_bad_suites_name_the_entry_and_field(tmp_path):
    path = tmp_path / "bad.json"
    for data, message in [
        ([{"dimension": ["color"]}], r"entry 0: field 'prompt_en' must be a non-empty string"),
        ([{"prompt_en": "a", "dimension": ["colour"]}], r"entry 0: field 'dimension' has \['colour'\]; allowed: "),
        ({"prompt_en": "a"}, "expected a non-empty JSON list"),
    ]:
        path.write_text(json.dumps(data))
        with pytest.raises(EvalError, match=message):
            load_suite(path)
    with pytest.raises(EvalError, match="does not exist"):
        load_suite(tmp_path / "missing.json")
    with pytest.raises(EvalError, match="path separator"):
        video_name("a/b", 0)


def test_shards_are_disjoint_and_cover_everything(full_info):
    videos = plan_videos(load_suite(full_info), num_samples=5, base_seed=0)  # 10 files
    for count in (1, 2, 3, 4, 7, 10, 13):
        parts = [select_shard(videos, Shard(i, count)) for i in range(count)]
        assert [v for part in parts for v in part] == videos  # contiguous, in order: disjoint and complete
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # composable: a data-parallel split inside a job's shard stays inside it
    job = select_shard(videos, Shard(1, 2))
    assert [v for g in range(3) for v in select_shard(job, Shard(g, 3))] == job
    assert parse_shard("2/8") == Shard(2, 8)
    for bad in ("8/8", "-1/4", "1", "a/b", "0/0"):
        with pytest.raises(EvalError, match="expected I/N"):
            parse_shard(bad)


def test_list_imports_no_torch(full_info):
    # torch (and so duca_video) made unimportable: --list must still work, so it loads no model.
    code = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    argv = [str(ROOT / "eval/vbench/generate.py"), "--full-info", str(full_info), "--list", "--num-samples", "2"]
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{RED}-0.mp4", f"{RED}-1.mp4", f"{BLUE}-0.mp4", f"{BLUE}-1.mp4"]
    shard = subprocess.run([sys.executable, "-c", code, *argv, "--shard", "1/2"], capture_output=True, text=True)
    assert shard.stdout.splitlines() == [f"{BLUE}-0.mp4", f"{BLUE}-1.mp4"]


def test_batches_are_contiguous_whatever_the_seeds():
    from duca_video.jobs import batch_jobs

    class Job:
        def __init__(self, name, seed):
            self.name, self.seed = name, seed

    jobs = [Job(f"p{p}-{k}", 42 + k) for p in range(3) for k in range(2)]
    batches = batch_jobs(jobs, 2)
    # Each video draws noise and token selection from its own seed, so batches need not share one.
    assert [[j.name for j in b] for b in batches] == [["p0-0", "p0-1"], ["p1-0", "p1-1"], ["p2-0", "p2-1"]]


# ---------------------------------------------------------------------------------------------------- generating
def _generate(full_info, save_dir, *extra):
    return generate.main(
        [
            "--full-info",
            str(full_info),
            "--config",
            str(ROOT / "configs" / "tiny.py"),
            "--num-samples",
            "2",
            "--num-sampling-steps",
            "2",
            "--save-dir",
            str(save_dir),
            "--quiet",
            *extra,
        ]
    )


def test_generation_resumes_after_a_kill(full_info, tmp_path, capsys):
    out = tmp_path / "videos"
    assert _generate(full_info, out) == 0
    names = [f"{RED}-0", f"{RED}-1", f"{BLUE}-0", f"{BLUE}-1"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [v["name"] for v in manifest["videos"]] == names
    assert [v["seed"] for v in manifest["videos"]] == [42, 43, 42, 43]  # tiny.py's seed 42, + k
    assert manifest["summary"]["complete"] == 4 and manifest["suite"]["distinct_prompts"] == 2
    for row in manifest["videos"]:
        record = json.loads((out / f"{row['name']}.json").read_text())
        assert row["latency_s"] == record["latency_s"] > 0 and row["dit_tflops"] == record["dit_tflops"] > 0
        assert record["seed"] == row["seed"] and record["prompt"] in (RED, BLUE)

    # A kill during the third video: its mp4 is there but not its record (written last), and a temporary file
    # of the dead process is left behind.
    (out / f"{BLUE}-0.json").unlink()
    stale = out / f".{BLUE}-0.mp4.999999999.tmp"
    stale.write_bytes(b"partial")
    before = {n: (out / f"{n}.mp4").stat().st_mtime_ns for n in names if n != f"{BLUE}-0"}
    capsys.readouterr()
    assert _generate(full_info, out) == 0
    assert "1 written, 3 skipped" in capsys.readouterr().out
    assert not stale.exists() and (out / f"{BLUE}-0.json").is_file()
    assert before == {n: (out / f"{n}.mp4").stat().st_mtime_ns for n in before}

    # Shards only report their own share; the suite flags are refused before anything runs.
    assert _generate(full_info, out, "--shard", "1/2") == 0
    shard = json.loads((out / "manifest.shard-1-of-2.json").read_text())
    assert [v["name"] for v in shard["videos"]] == names[2:] and shard["summary"]["complete"] == 2
    assert _generate(full_info, out, "--prompt", "a cat") == 2
    assert "--prompt: the prompts, names and samples come from the suite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- scoring
def test_score_dry_run_prints_one_worker_per_dimension(full_info, tmp_path, capsys, monkeypatch):
    videos, scores = tmp_path / "videos", tmp_path / "scores"
    videos.mkdir()
    for name in (f"{RED}-0", f"{RED}-1", f"{BLUE}-0", f"{BLUE}-1"):
        (videos / f"{name}.mp4").write_bytes(b"")
        (videos / f"{name}.json").write_text("{}")  # records beside the videos: VBench must not see them
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "cache"))
    args = [
        "--videos",
        str(videos),
        "--score-dir",
        str(scores),
        "--full-info",
        str(full_info),
        "--num-samples",
        "2",
        "--gpus",
        "0,1,2",
        "--dry-run",
        "--local",
    ]
    assert score.main(args) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if "--worker" in line]
    assert sorted(c.split("--dimension ")[1].split()[0] for c in commands) == sorted(DIMENSIONS)
    assert {c.split()[0] for c in commands} == {
        "CUDA_VISIBLE_DEVICES=0",
        "CUDA_VISIBLE_DEVICES=1",
        "CUDA_VISIBLE_DEVICES=2",
    }
    assert all("HF_HUB_OFFLINE=1" in c and c.rstrip().endswith(".log 2>&1") and "--local" in c for c in commands)
    assert f"--videos {scores / 'videos'}" in commands[0]  # the links-only folder, not the records' folder
    assert "warning: --local: missing" in out
    assert not scores.exists()  # a dry run creates nothing

    (videos / f"{BLUE}-1.mp4").unlink()
    assert score.main(args) == 2
    assert "1 of the suite's 4 videos are not in" in capsys.readouterr().err
    assert score.main([*args, "--allow-missing", "--dimensions", "color,scene"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if "--worker" in line]) == 2


def test_score_assignment_and_links(full_info, tmp_path):
    plan = score.assign(DIMENSIONS, ["0", "1", "2", "3"])
    assert sorted(d for dims in plan.values() for d in dims) == sorted(DIMENSIONS)
    assert plan["0"][0] == "multiple_objects"  # costliest first
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / f"{RED}-0.mp4").write_bytes(b"x")
    (videos / f"{RED}-0.json").write_text("{}")
    view = tmp_path / "view"
    assert score.make_view(videos, [f"{RED}-0", f"{RED}-1"], view) == 1
    assert [p.name for p in view.iterdir()] == [f"{RED}-0.mp4"]
    assert score.make_view(videos, [f"{RED}-0"], view) == 1  # rebuilt, not duplicated


# ---------------------------------------------------------------------------------------------------- tabulating
# The notes' table (min, max, weight), written out again here so the test checks the code against the notes.
NOTES = {
    "subject_consistency": (0.1462, 1.0, 1),
    "background_consistency": (0.2615, 1.0, 1),
    "temporal_flickering": (0.6293, 1.0, 1),
    "motion_smoothness": (0.706, 0.9975, 1),
    "dynamic_degree": (0.0, 1.0, 0.5),
    "aesthetic_quality": (0, 1, 1),
    "imaging_quality": (0, 1, 1),
    "object_class": (0, 1, 1),
    "multiple_objects": (0, 1, 1),
    "human_action": (0, 1, 1),
    "color": (0, 1, 1),
    "spatial_relationship": (0, 1, 1),
    "scene": (0.0, 0.8222, 1),
    "appearance_style": (0.0009, 0.2855, 1),
    "temporal_style": (0.0, 0.364, 1),
    "overall_consistency": (0.0, 0.364, 1),
}
RAW = {
    "subject_consistency": 0.9609,
    "background_consistency": 0.9717,
    "temporal_flickering": 0.9918,
    "motion_smoothness": 0.9887,
    "dynamic_degree": 0.4222,
    "aesthetic_quality": 0.5663,
    "imaging_quality": 0.6399,
    "object_class": 0.8276,
    "multiple_objects": 0.4514,
    "human_action": 0.91,
    "color": 0.8195,
    "spatial_relationship": 0.6808,
    "scene": 0.4220,
    "appearance_style": 0.2368,
    "temporal_style": 0.2437,
    "overall_consistency": 0.2670,
}


def _write_results(folder, raw, per_file=1):
    folder.mkdir(exist_ok=True)
    dims = list(raw)
    for i in range(0, len(dims), per_file):
        chunk = {d: [raw[d], [{"video_path": "x.mp4", "video_results": raw[d]}]] for d in dims[i : i + per_file]}
        (folder / f"part{i}_eval_results.json").write_text(json.dumps(chunk))


def test_tabulation_matches_a_hand_computed_total(tmp_path, capsys):
    norm = {d: (RAW[d] - lo) / (hi - lo) * w for d, (lo, hi, w) in NOTES.items()}
    quality = sum(norm[d] for d in list(NOTES)[:7]) / 6.5
    semantic = sum(norm[d] for d in list(NOTES)[7:]) / 9
    total = (4 * quality + semantic) / 5
    _write_results(tmp_path / "s", RAW, per_file=3)  # dimensions spread over several files
    assert tabulate.main(["--score-dir", str(tmp_path / "s")]) == 0
    scaled = json.loads((tmp_path / "s" / "scaled_results.json").read_text())
    assert scaled["total"] == pytest.approx(100 * total, abs=1e-9)
    assert scaled["quality"] == pytest.approx(100 * quality) and scaled["semantic"] == pytest.approx(100 * semantic)
    assert scaled["dimensions"]["scene"] == pytest.approx(42.20)
    assert scaled["normalized_dimensions"]["dynamic_degree"] == pytest.approx(100 * 0.4222 * 0.5)
    assert json.loads((tmp_path / "s" / "all_results.json").read_text()) == RAW
    assert scaled["missing"] == [] and scaled["complete"] is True
    assert f"| total | {100 * total:.2f} |" in capsys.readouterr().out


def test_missing_dimension_is_an_error_unless_allowed(tmp_path, capsys):
    _write_results(tmp_path / "s", {d: v for d, v in RAW.items() if d != "scene"})
    assert tabulate.main(["--score-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "missing dimension(s)" in err and ": scene;" in err and "--allow-missing" in err
    assert not (tmp_path / "s" / "scaled_results.json").exists()
    assert tabulate.main(["--score-dir", str(tmp_path / "s"), "--allow-missing"]) == 0
    scaled = json.loads((tmp_path / "s" / "scaled_results.json").read_text())
    assert scaled["missing"] == ["scene"] and scaled["total"] is None and scaled["semantic"] is None
    assert scaled["quality"] is not None and scaled["dimensions"]["scene"] is None
    assert "missing: scene" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [1.3, -0.1, float("nan"), float("inf")])
def test_a_score_outside_0_1_is_an_error(tmp_path, capsys, bad):
    # A percentage where VBench writes a fraction, or NaN from a failed dimension, would give a plausible total.
    _write_results(tmp_path / "s", {**RAW, "color": bad}, per_file=16)  # json writes nan / inf as NaN / Infinity
    capsys.readouterr()
    assert tabulate.main(["--score-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "part0_eval_results.json" in err and "Traceback" not in err
    assert f"dimension 'color' scores {bad}, outside [0, 1]" in err
    assert not (tmp_path / "s" / "scaled_results.json").exists()


def test_bad_results_name_the_file_and_field(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "a_eval_results.json").write_text(json.dumps({"colour": [0.5, []]}))
    with pytest.raises(EvalError, match=r"a_eval_results.json'.*unknown dimension 'colour'; allowed: "):
        tabulate.read_results(folder)
    (folder / "a_eval_results.json").write_text(json.dumps({"color": ["high", []]}))
    with pytest.raises(EvalError, match=r"field 'color' must be \[aggregate number"):
        tabulate.read_results(folder)
    (folder / "a_eval_results.json").write_text(json.dumps({"color": [0.5, []]}))
    (folder / "b_eval_results.json").write_text(json.dumps({"color": [0.6, []]}))
    with pytest.raises(EvalError, match="'color' is in both 'a_eval_results.json' .* remove the stale one"):
        tabulate.read_results(folder)
    with pytest.raises(EvalError, match="no \\*_eval_results.json"):
        tabulate.read_results(tmp_path)


# ---------------------------------------------------------------------------------------------------- the report
def _identity(i, **changed):
    """The record fields that say which video NAME.mp4 is (eval.common.PAIR_FIELDS), as the pipeline writes them."""
    fields = {
        "prompt": f"prompt {i}",
        "text": f"prompt {i}",
        "seed": 42 + i,
        "image_size": [16, 16],
        "video_size": [16, 16],
        "frames": 8,
        "fps": 8,
    }
    return {**fields, **changed}


def _records(folder, latencies, tflops, changed=None):
    folder.mkdir()
    for i, (lat, fl) in enumerate(zip(latencies, tflops)):
        (folder / f"v{i}.mp4").write_bytes(b"")
        record = {
            **_identity(i, **(changed or {}).get(i, {})),
            "latency_s": lat,
            "dit_tflops": fl,
            "cache_bytes": 2**20,
        }
        (folder / f"v{i}.json").write_text(json.dumps(record))


def test_report_side_by_side(tmp_path):
    _records(tmp_path / "none", [4.0, 6.0], [100.0, 100.0])
    _records(tmp_path / "duca", [2.0, 2.0], [40.0, 40.0])
    folders = {"none": tmp_path / "none", "duca": tmp_path / "duca"}
    vbench = {"duca": {"total": 79.5, "quality": 80.0, "semantic": 77.5, "missing": []}}
    fidelity = {
        "summary": {"duca": {"psnr_mean": 30.0, "ssim_mean": 0.9, "lpips_mean": None}},
        "lpips": {"available": False, "reason": "no lpips here"},
    }
    rows, notes = build_rows("none", folders, vbench, fidelity)
    assert rows[0][:4] == ["none", "2", "5.00", "1.00"]
    assert rows[1][:6] == ["duca", "2", "2.00", "2.50", "40", "2.50"]  # 10 s / 4 s, 200 / 80 TFLOPs
    assert rows[1][8:] == ["79.50", "80.00", "77.50", "30.00", "0.9000", "-"]
    assert notes == ["LPIPS unavailable: no lpips here"]
    costs = compare_costs({"a": {**_identity(0), "latency_s": 2.0}}, {"a": {**_identity(0), "latency_s": None}})
    assert costs["latency_speedup"] is None and costs["latency_s_mean"] is None


def test_report_refuses_costs_of_other_videos(tmp_path, capsys):
    # v1 of the method was sampled with another seed, v2 at another size: their costs are not v1's and v2's.
    _records(tmp_path / "none", [4.0, 6.0, 8.0], [100.0, 100.0, 100.0])
    _records(
        tmp_path / "duca",
        [2.0, 1.0, 1.0],
        [40.0, 10.0, 10.0],
        changed={1: {"seed": 7}, 2: {"frames": 16, "video_size": [32, 32]}},
    )
    folders = {"none": tmp_path / "none", "duca": tmp_path / "duca"}
    with pytest.raises(EvalError, match=r"(?s)2 video pair\(s\).*video 'v1': seed differs: reference 43, method 7"):
        build_rows("none", folders, {}, None)
    argv = ["--reference", str(tmp_path / "none"), "--methods", f"duca={tmp_path / 'duca'}"]
    capsys.readouterr()
    assert report_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 video pair(s)") and "Traceback" not in err
    assert (
        "video 'v2': video_size differs: reference [16, 16], method [32, 32]; frames differs: reference 8, "
        "method 16" in err
    )
    assert report_main([*argv, "--exclude-mismatched"]) == 0
    out = capsys.readouterr()
    assert "| duca | 1 | 2.00 | 2.00 | 40 | 2.50 |" in out.out  # v0 alone: 4 s / 2 s, 100 / 40 TFLOPs
    assert "excluded as mismatched (--exclude-mismatched): method 'duca', video 'v1': seed differs" in out.out
    assert "method 'duca', video 'v2'" in out.err
    with pytest.raises(EvalError, match=r"video 'a': the records do not describe the same video \(seed differs"):
        compare_costs({"a": _identity(0)}, {"a": _identity(0, seed=1)})


def test_named_paths():
    assert parse_named_paths("a=x, b = y/z", "--methods") == {"a": Path("x"), "b": Path("y/z")}
    for bad, message in (("a", "expected NAME=PATH"), ("a=x,a=y", "given twice"), ("", "no NAME=PATH")):
        with pytest.raises(EvalError, match=message):
            parse_named_paths(bad, "--methods")


def test_scripts_run_from_any_folder(tmp_path):
    # As files (python eval/...), from another working directory: the repository root is found from __file__.
    _write_results(tmp_path / "s", RAW)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "eval/vbench/tabulate.py"), "--score-dir", str(tmp_path / "s")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
