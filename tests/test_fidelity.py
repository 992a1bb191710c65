"""Video fidelity: PSNR / SSIM / LPIPS of decoded videos, reading mp4 files back, and eval/fidelity.py end to end."""

import csv
import json
import math
import shutil
import sys

import pytest
import torch

from duca_video.io import write_video
from duca_video.metrics.fidelity import load_lpips, psnr, ssim, video_fidelity
from duca_video.metrics.video import read_video
from eval import fidelity as fidelity_cli


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


def _folder(path, videos, latency, tflops):
    path.mkdir()
    for name, frames in videos.items():
        write_video(path / f"{name}.mp4", frames, fps=8)
        (path / f"{name}.json").write_text(json.dumps({"latency_s": latency, "dit_tflops": tflops}))


def test_fidelity_command_end_to_end(tmp_path, capsys):
    ref = {"p-0": video(0, h=16, w=16), "p-1": video(1, h=16, w=16)}
    _folder(tmp_path / "none", ref, latency=4.0, tflops=100.0)
    shutil.copytree(tmp_path / "none", tmp_path / "copy")
    noisy = {"p-0": (ref["p-0"].int() + 40).clamp(0, 255).to(torch.uint8)}  # p-1 missing
    _folder(tmp_path / "fast", noisy, latency=1.0, tflops=25.0)
    out = tmp_path / "out"
    argv = ["--reference", str(tmp_path / "none"), "--methods", f"copy={tmp_path / 'copy'},fast={tmp_path / 'fast'}",
            "--out", str(out)]  # fmt: skip
    assert fidelity_cli.main(argv) == 0

    rows = list(csv.DictReader((out / "fidelity_per_video.csv").open()))
    assert [(r["method"], r["name"]) for r in rows] == [("copy", "p-0"), ("copy", "p-1"), ("fast", "p-0")]
    assert rows[0]["psnr"] == "inf" and float(rows[0]["ssim"]) == pytest.approx(1.0)
    assert 10 < float(rows[2]["psnr"]) < 30
    summary = json.loads((out / "fidelity_summary.json").read_text())
    copy, fast = summary["summary"]["copy"], summary["summary"]["fast"]
    assert copy["psnr_mean"] == "inf" and copy["identical"] == 2 and copy["latency_speedup"] == 1.0
    assert fast["pairs"] == 1 and fast["missing"] == 1
    assert fast["latency_speedup"] == 4.0 and fast["flops_speedup"] == 4.0
    assert summary["lpips"]["available"] or summary["lpips"]["reason"]  # a value, or why there is none
    assert "| fast | 1 |" in (out / "fidelity_summary.md").read_text()
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
