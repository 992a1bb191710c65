"""The SDPA backend probe, run as users run it (main(argv)), on the CPU."""

import json

import pytest
import torch

from duca_video.models.sdpa_probe import attention_sites, geometry, main


def test_geometry_is_open_soras_latent_grid():
    g = geometry("480p", "9:16", 51)  # 480x854 -> 60x106 latent -> 30x53 patches; 51 frames -> 15
    assert (g.frames, g.height, g.width, g.spatial) == (15, 30, 53, 1590)
    g = geometry("720p", "9:16", 102)  # 720x1280 -> 45x80 patches; 102 frames = 6 chunks of 17 -> 30
    assert (g.frames, g.height, g.width) == (30, 45, 80)
    assert geometry("144p", "9:16", 1).frames == 1  # an image


def test_sites_carry_the_cut_shapes():
    sites = {s.name: s for s in attention_sites(geometry("480p", "9:16", 51), rows=2, sp=4, text_tokens=40)}
    spatial = sites["spatial self"]
    assert (spatial.batch, spatial.heads, spatial.queries, spatial.keys, spatial.masked) == (30, 4, 1592, 1590, False)
    assert sites["spatial self, padding masked (before)"].keys == 1592
    assert (sites["temporal self"].batch, sites["temporal self"].keys) == (2 * 398, 15)
    agree = sites["cross, text cut, lengths agree"]
    assert (agree.queries, agree.keys, agree.masked) == (15 * 398, 40, False)
    assert sites["cross, uncut (before)"].keys == 300 and sites["cross, uncut (before)"].masked
    # Without SP there is no padding, so no "before" row for it.
    names = {s.name for s in attention_sites(geometry("480p", "9:16", 51))}
    assert "spatial self, padding masked (before)" not in names


def test_probe_cli_reports_each_site_and_backend_on_cpu(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert (
        main(
            [
                "--resolution",
                "240p",
                "--frames",
                "17",
                "--sp",
                "4",
                "--text-tokens",
                "12",
                "--dtype",
                "fp32",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "CPU: PyTorch offers its math kernel" in printed and "spatial self" in printed
    report = json.loads(out.read_text())
    assert report["grid"] == {"frames": 5, "height": 15, "width": 27}  # 426 px -> 53 latent -> 27 patches
    assert report["duca_attention"] == "sdpa"
    sites = {s["name"]: s for s in report["sites"]}
    assert len(sites) == 6
    assert (sites["spatial self"]["queries"], sites["spatial self"]["keys"]) == (408, 405)
    for site in sites.values():
        backends = site["backends"]
        assert site["trial_batch"] == 1 and backends["MATH"]["accepted"]
        # The memory-efficient and cuDNN kernels are CUDA only: refused here, with PyTorch's message.
        assert not backends["EFFICIENT_ATTENTION"]["accepted"] and backends["EFFICIENT_ATTENTION"]["reason"]
        assert not backends["CUDNN_ATTENTION"]["accepted"]
        assert site["default"] in ("FLASH_ATTENTION", "MATH")
        if site["default"] == "FLASH_ATTENTION":
            assert backends["FLASH_ATTENTION"]["accepted"]


def test_probe_times_accepted_backends(capsys):
    assert main(["--resolution", "144p", "--frames", "1", "--time", "--trial-batch", "2"]) == 0
    assert "ms" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sp", "3"], "SP size must divide the head count 16"),
        (["--text-tokens", "0"], "--text-tokens 0: allowed 1..300"),
        (["--frames", "0"], "--frames must be >= 1"),
        (["--device", "nonsense"], "allowed values are cpu, cuda"),
    ],
)
def test_bad_arguments_are_clear_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["--resolution", "144p", *argv])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_cuda_without_cuda_says_so():
    with pytest.raises(SystemExit, match="CUDA is not available"):
        main(["--device", "cuda"])
