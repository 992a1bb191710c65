"""Video fidelity: PSNR / SSIM / LPIPS of decoded videos, reading mp4 files back, eval/fidelity.py end to end, and
its refusal to compare videos of one name that are not the same video (other seed, prompt, size, frames)."""

import csv
import json
import math
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from duca_video.io import write_video
from duca_video.metrics.fidelity import load_lpips, psnr, ssim, video_fidelity
from duca_video.metrics.video import read_video
from eval import fidelity as fidelity_cli
from eval import report as report_cli

ROOT = Path(__file__).resolve().parents[1]


def video(seed=0, t=5, h=24, w=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(20, 236, (t, h, w, 3), generator=g, dtype=torch.uint8)


def test_identical_videos():
    v = video()
    scores = video_fidelity(v, v.clone())
    assert scores == {"psnr": math.inf, "ssim": pytest.approx(1.0), "lpips": None}


def test_known_noise_gives_known_psnr():
    v = video()
    sign = (torch.arange(v.numel()).reshape(v.shape) % 2) * 2 - 1  # +-5 everywhere: MSE exactly 25
    noisy = (v.int() + 5 * sign).to(torch.uint8)
    scores = video_fidelity(v, noisy)
    assert scores["psnr"] == pytest.approx(20 * math.log10(255 / 5), abs=1e-9)  # 34.15 dB
    assert 0 < scores["ssim"] < 1


def test_chunking_changes_nothing():
    a, b = video(0, t=7), video(1, t=7)
    whole = video_fidelity(a, b, chunk=100)
    assert video_fidelity(a, b, chunk=3) == pytest.approx(whole)
    planes_a, planes_b = a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)
    assert whole["psnr"] == pytest.approx(psnr(planes_a, planes_b, 255.0))
    assert whole["ssim"] == pytest.approx(ssim(planes_a, planes_b, 255.0))


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match=r"videos differ in shape: \(5, 24, 32, 3\) vs \(4, 24, 32, 3\)"):
        video_fidelity(video(), video(t=4))
    with pytest.raises(ValueError, match="uint8"):
        video_fidelity(video().float(), video().float())


def test_lpips_unavailable_gives_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # as on a machine without lpips / torchvision
    model, reason = load_lpips("alex")
    assert model is None and "lpips package cannot be imported" in reason
    with pytest.raises(ValueError, match="allowed: alex, vgg, squeeze"):
        load_lpips("resnet")


def test_read_video_round_trip(tmp_path):
    frames = torch.full((4, 16, 16, 3), 128, dtype=torch.uint8)
    write_video(tmp_path / "a.mp4", frames, fps=8)
    back = read_video(tmp_path / "a.mp4")
    assert back.shape == (4, 16, 16, 3) and back.dtype == torch.uint8
    assert (back.int() - 128).abs().max() <= 3  # lossy codec, flat grey survives
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot be decoded"):
        read_video(tmp_path / "bad.mp4")


def _record(name, frames, latency, tflops, **changed):
    """The fields of duca_video.jobs.make_record that say which video this is, for the frames written."""
    t, h, w, _ = frames.shape
    record = {
        "name": name,
        "prompt": f"prompt of {name}",
        "text": f"prompt of {name}",
        "seed": 42,
        "sample_index": 0,
        "method": "none",
        "image_size": [h, w],
        "video_size": [h, w],
        "frames": t,
        "fps": 8,
        "latency_s": latency,
        "dit_tflops": tflops,
        "files": {"video": f"{name}.mp4"},
    }
    return {**record, **changed}


def _folder(path, videos, latency, tflops, changed=None):
    """NAME.mp4 + NAME.json per video; `changed` {name: {field: value}} edits those records."""
    path.mkdir()
    for name, frames in videos.items():
        write_video(path / f"{name}.mp4", frames, fps=8)
        record = _record(name, frames, latency, tflops, **(changed or {}).get(name, {}))
        (path / f"{name}.json").write_text(json.dumps(record))


def test_fidelity_command_end_to_end(tmp_path, capsys):
    ref = {"p-0": video(0, h=16, w=16), "p-1": video(1, h=16, w=16)}
    _folder(tmp_path / "none", ref, latency=4.0, tflops=100.0)
    shutil.copytree(tmp_path / "none", tmp_path / "copy")
    noisy = {"p-0": (ref["p-0"].int() + 40).clamp(0, 255).to(torch.uint8)}  # p-1 missing
    _folder(tmp_path / "fast", noisy, latency=1.0, tflops=25.0)
    out = tmp_path / "out"
    argv = [
        "--reference",
        str(tmp_path / "none"),
        "--methods",
        f"copy={tmp_path / 'copy'},fast={tmp_path / 'fast'}",
        "--out",
        str(out),
    ]
    assert fidelity_cli.main(argv) == 0

    rows = list(csv.DictReader((out / "fidelity_per_video.csv").open()))
    assert [(r["method"], r["name"]) for r in rows] == [("copy", "p-0"), ("copy", "p-1"), ("fast", "p-0")]
    assert rows[0]["psnr"] == "inf" and float(rows[0]["ssim"]) == pytest.approx(1.0)
    assert 10 < float(rows[2]["psnr"]) < 30
    summary = json.loads((out / "fidelity_summary.json").read_text())
    copy, fast = summary["summary"]["copy"], summary["summary"]["fast"]
    assert copy["psnr_mean"] == "inf" and copy["identical"] == 2 and copy["latency_speedup"] == 1.0
    assert fast["pairs"] == 1 and fast["missing"] == 1 and fast["excluded"] == 0 and summary["excluded"] == []
    assert fast["latency_speedup"] == 4.0 and fast["flops_speedup"] == 4.0
    assert summary["lpips"]["available"] or summary["lpips"]["reason"]  # a value, or why there is none
    assert "| fast | 1 | 0 |" in (out / "fidelity_summary.md").read_text()
    if summary["plot"] is not None:
        assert (out / "fidelity_speedup.png").stat().st_size > 0
    else:
        assert "matplotlib" in summary["plot_skipped"]

    capsys.readouterr()
    assert fidelity_cli.main([*argv[:2], "--methods", f"x={tmp_path / 'nowhere'}", "--out", str(out)]) == 2
    assert "video folder" in capsys.readouterr().err


class FakeLPIPS(torch.nn.Module):
    """Stands in for lpips.LPIPS: mean absolute difference per frame, checking the inputs lpips expects."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, x, y):
        if self.fail:
            raise RuntimeError("input image is too small")
        assert x.dtype == torch.float32 and x.shape[1] == 3 and x.min() >= -1 and x.max() <= 1
        return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_is_the_mean_over_frames():
    a, b = video(0), video(1)
    expected = ((a.float() - b.float()).abs() / 127.5).mean().item()
    assert video_fidelity(a, b, FakeLPIPS(), chunk=2)["lpips"] == pytest.approx(expected, rel=1e-5)


def test_lpips_failure_reports_none_for_all(tmp_path, monkeypatch):
    import duca_video.metrics.fidelity as fid

    _folder(tmp_path / "none", {"p-0": video(0, h=16, w=16)}, latency=1.0, tflops=1.0)
    _folder(tmp_path / "m", {"p-0": video(1, h=16, w=16)}, latency=1.0, tflops=1.0)
    monkeypatch.setattr(fid, "load_lpips", lambda net, device: (FakeLPIPS(fail=True), None))
    result = fidelity_cli.compare(tmp_path / "none", {"m": tmp_path / "m"})
    assert result["per_video"][0]["lpips"] is None and result["summary"]["m"]["lpips_mean"] is None
    assert result["lpips"]["available"] is False and "too small" in result["lpips"]["reason"]
    monkeypatch.setattr(fid, "load_lpips", lambda net, device: (FakeLPIPS(), None))
    assert fidelity_cli.compare(tmp_path / "none", {"m": tmp_path / "m"})["summary"]["m"]["lpips_mean"] > 0


# ---------------------------------------------------------------------------------------------------- pairing
RED = "a large red square moving left on a dark background"
BLUE = "a small blue circle moving up on a light background"
GREEN = "a large green circle moving right on a dark background"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs of scripts/inference.py on configs/tiny.py: the reference (no cache, seed 42, prompts RED,
    BLUE) and a DuCa run with seed 7 and prompts RED, GREEN: the same file names, other videos."""
    inference = runpy.run_path(str(ROOT / "scripts" / "inference.py"), run_name="inference_cli")["main"]
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is much faster than two fighting
    try:
        for folder, seed, method, prompts in (("none", 42, "none", [RED, BLUE]), ("other", 7, "duca", [RED, GREEN])):
            argv = [
                "--config",
                str(ROOT / "configs" / "tiny.py"),
                "--prompt",
                *prompts,
                "--seed",
                str(seed),
                "--cache",
                method,
                "--num-sampling-steps",
                "2",
                "--save-dir",
                str(root / folder),
            ]
            assert inference(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def test_another_seed_or_prompt_is_refused(runs, tmp_path, capsys):
    names = sorted(p.stem for p in (runs / "none").glob("*.mp4"))
    assert len(names) == 2
    out = tmp_path / "out"
    argv = ["--reference", str(runs / "none"), "--lpips", "off", "--out", str(out)]
    capsys.readouterr()
    assert fidelity_cli.main([*argv, "--methods", f"other={runs / 'other'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 video pair(s) do not compare the same video") and "Traceback" not in err
    assert f"method 'other', video '{names[0]}': seed differs: reference 42, method 7" in err
    assert f"prompt differs: reference {BLUE!r}, method {GREEN!r}" in err and "--exclude-mismatched" in err
    assert not out.exists()  # nothing written from a comparison that is not one

    # One folder merged from both runs: the first video is the reference's own, the second the other run's.
    mixed = tmp_path / "mixed"
    shutil.copytree(runs / "none", mixed)
    for ext in (".mp4", ".json"):
        shutil.copy(runs / "other" / f"{names[1]}{ext}", mixed / f"{names[1]}{ext}")
    assert fidelity_cli.main([*argv, "--methods", f"mixed={mixed}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 video pair(s)") and f"video '{names[1]}': prompt differs" in err
    assert "seed differs: reference 42, method 7" in err and f"video '{names[0]}'" not in err

    assert fidelity_cli.main([*argv, "--methods", f"mixed={mixed}", "--exclude-mismatched"]) == 0
    captured = capsys.readouterr()
    assert f"excluded (--exclude-mismatched): method 'mixed', video '{names[1]}': prompt differs" in captured.err
    summary = json.loads((out / "fidelity_summary.json").read_text())
    assert summary["summary"]["mixed"]["pairs"] == 1 and summary["summary"]["mixed"]["excluded"] == 1
    assert summary["summary"]["mixed"]["identical"] == 1 and summary["summary"]["mixed"]["missing"] == 0
    [excluded] = summary["excluded"]
    assert excluded["method"] == "mixed" and excluded["name"] == names[1]
    assert "seed differs: reference 42, method 7" in excluded["problems"]
    assert [r["name"] for r in summary["per_video"]] == [names[0]]
    assert f"method 'mixed', video '{names[1]}'" in (out / "fidelity_summary.md").read_text()

    # The report's costs: the same refusal, the same way out.
    assert report_cli.main(["--reference", str(runs / "none"), "--methods", f"other={runs / 'other'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 video pair(s)") and "seed differs: reference 42, method 7" in err
    assert (
        report_cli.main(
            [
                "--reference",
                str(runs / "none"),
                "--methods",
                f"mixed={mixed}",
                "--fidelity",
                str(out / "fidelity_summary.json"),
                "--exclude-mismatched",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| mixed | 1 | " in text
    assert f"excluded as mismatched (--exclude-mismatched): method 'mixed', video '{names[1]}'" in text
    assert "fidelity left out 1 mismatched pair(s)" in text


def test_other_frames_size_or_a_missing_record_is_refused(tmp_path, capsys):
    ref = {f"p-{i}": video(i, h=16, w=16) for i in range(5)}
    _folder(tmp_path / "none", ref, latency=2.0, tflops=10.0)
    (tmp_path / "none" / "p-4.json").unlink()  # the reference's writer died before its record
    method = {
        "p-0": video(0, t=4, h=16, w=16),
        "p-1": video(1, h=16, w=24),
        "p-2": video(7, h=16, w=16),
        "p-3": ref["p-3"],
        "p-4": ref["p-4"],
    }
    _folder(tmp_path / "m", method, latency=1.0, tflops=5.0)
    (tmp_path / "m" / "p-3.json").unlink()
    argv = [
        "--reference",
        str(tmp_path / "none"),
        "--methods",
        f"m={tmp_path / 'm'}",
        "--lpips",
        "off",
        "--out",
        str(tmp_path / "out"),
    ]
    capsys.readouterr()
    assert fidelity_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: 4 video pair(s)" in err and "Traceback" not in err
    assert "method 'm', video 'p-0': frames differs: reference 5, method 4" in err
    assert "method 'm', video 'p-1': image_size differs: reference [16, 16], method [16, 24]; video_size" in err
    assert "method 'm', video 'p-3': no record p-3.json beside" in err
    assert "reference video 'p-4': no record p-4.json beside" in err
    assert "'p-2'" not in err

    assert fidelity_cli.main([*argv, "--exclude-mismatched"]) == 0
    summary = json.loads((tmp_path / "out" / "fidelity_summary.json").read_text())
    m = summary["summary"]["m"]
    assert (m["pairs"], m["excluded"], m["missing"]) == (1, 4, 0) and m["latency_speedup"] == 2.0
    assert [(e["method"], e["name"]) for e in summary["excluded"]] == [
        (None, "p-4"),
        ("m", "p-0"),
        ("m", "p-1"),
        ("m", "p-3"),
    ]
    assert 0 < summary["per_video"][0]["psnr"] < 40  # p-2, scored

    # Only mismatched pairs: excluding them all leaves nothing to report, which is said rather than a table.
    assert (
        fidelity_cli.main(
            [
                *argv[:2],
                "--methods",
                f"m={tmp_path / 'm'}",
                "--limit",
                "2",
                "--lpips",
                "off",
                "--out",
                str(tmp_path / "out"),
                "--exclude-mismatched",
            ]
        )
        == 2
    )
    assert "every video it shares with the reference was excluded" in capsys.readouterr().err


def test_a_video_that_is_not_its_records_file_is_refused(tmp_path, capsys):
    ref = {"p-0": video(0, h=16, w=16), "p-1": video(1, h=16, w=16)}
    _folder(tmp_path / "none", ref, latency=1.0, tflops=1.0)
    _folder(tmp_path / "m", ref, latency=1.0, tflops=1.0)
    # p-0 renamed from another file; p-1's record (in the dict form) gives a size and a hash the file lacks.
    record = json.loads((tmp_path / "m" / "p-0.json").read_text())
    (tmp_path / "m" / "p-0.json").write_text(json.dumps({**record, "files": {"video": "q-9.mp4"}}))
    size = (tmp_path / "m" / "p-1.mp4").stat().st_size
    record = json.loads((tmp_path / "m" / "p-1.json").read_text())
    (tmp_path / "m" / "p-1.json").write_text(
        json.dumps({**record, "files": {"video": {"name": "p-1.mp4", "bytes": size, "sha256": "0" * 64}}})
    )
    argv = [
        "--reference",
        str(tmp_path / "none"),
        "--methods",
        f"m={tmp_path / 'm'}",
        "--lpips",
        "off",
        "--out",
        str(tmp_path / "out"),
    ]
    capsys.readouterr()
    assert fidelity_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "video 'p-0': its record describes 'q-9.mp4', not 'p-0.mp4'" in err
    assert "video 'p-1': " in err and "does not have the sha256 its record gives (0000" in err
