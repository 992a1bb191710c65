"""The scaling model: bytes from our SP shapes, its arithmetic on hand-checked cases, and the CLI's comparison
with Open-Sora's published 720p 16 s numbers."""

import pytest

from duca_video.metrics import scaling
from duca_video.metrics.benchmark import BenchSetup
from duca_video.metrics.scaling import Links, SizeProfile, predict
from duca_video.metrics.steps import StepCost, forward_cost, loop_steps, ulysses_bytes_per_forward
from duca_video.models import STDiT3Config

CFG = STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8)


def test_ulysses_bytes_by_hand_and_equal_to_what_our_sp_sends():
    # latent (3, 6, 10), patch (1, 2, 2): S = 3 * 5 = 15, padded to 16 on 2 ranks -> s_local 8.
    # Per spatial block, per rank: qkv 2 rows * 3 frames * 8 tokens * 3 * 64 ch * 2 B = 18432, half of it sent;
    # output 2 * 3 * 8 * 64 * 2 = 6144, half sent -> 12288 per block, 2 blocks -> 24576.
    assert ulysses_bytes_per_forward(CFG, (3, 6, 10), rows=2, sp_size=2) == 24576
    for p in (2, 4):
        _, counted = forward_cost(CFG, (3, 6, 10), (48, 80), rows=2, sp_size=p)
        assert counted == ulysses_bytes_per_forward(CFG, (3, 6, 10), rows=2, sp_size=p) > 0
    assert ulysses_bytes_per_forward(CFG, (3, 6, 10), rows=2, sp_size=1) == 0


def test_cached_steps_send_nothing_and_full_steps_send_the_forward_bytes():
    setup = BenchSetup(
        model=CFG,
        latent_shape=(3, 6, 10),
        image_size=(48, 80),
        num_frames=9,
        num_steps=8,
        cfg_scale=4.0,
        use_timestep_transform=False,
    )
    steps = loop_steps(setup, "fora", sp_size=2)
    full_bytes = ulysses_bytes_per_forward(CFG, (3, 6, 10), rows=2, sp_size=2)
    assert {s.kind for s in steps} == {"full", "conservative"}
    for s in steps:
        assert s.bytes_sent == (full_bytes if s.kind == "full" else 0)
    one_rank = loop_steps(setup, "fora")
    assert all(a.flops > b.flops for a, b in zip(one_rank, steps) if a.kind == "full")


def _profile(flops_per_step=1e15, steps=10, comm=None):
    """Hand-made: XL widths, a 480p-like latent, every forward splits perfectly over p ranks."""
    cfg = STDiT3Config()
    shares = {p: 1.0 / p for p in (1, 2, 4, 8)}
    halves = {p: 0.5 / p for p in (1, 2, 4, 8)}
    costs = [StepCost("full", int(flops_per_step), 0) for _ in range(steps)]
    return SizeProfile("hand", cfg, (15, 60, 106), costs, comm or [True] * steps, shares, halves)


def test_arithmetic_on_a_hand_checked_case():
    prof, links = _profile(), Links(nvlink_gbps=100.0, nvlink_latency_us=0.0)
    one = predict(prof, 500.0, links, 1, "sp", "nvlink")
    assert one["time_s"] == pytest.approx(10 * 1e15 / 500e12) and one["comm_s"] == 0  # 20 s, nothing sent
    two = predict(prof, 500.0, links, 2, "sp", "nvlink")
    sent = ulysses_bytes_per_forward(prof.config, (15, 60, 106), rows=2, sp_size=2)
    assert two["compute_s"] == pytest.approx(10.0)
    assert two["comm_s"] == pytest.approx(10 * sent / 100e9)
    # DP: p videos on p GPUs, nothing sent, perfect scaling of the time per video
    for p in range(1, 9):
        dp = predict(prof, 500.0, links, p, "dp", "nvlink")
        assert dp["time_s"] == pytest.approx(one["time_s"] / p) and dp["comm_s"] == 0
    # SP needs p to divide the 16 heads; CFG + SP needs p even with p / 2 dividing them
    assert predict(prof, 500.0, links, 3, "sp", "nvlink") is None
    assert predict(prof, 500.0, links, 3, "cfg+sp", "nvlink") is None
    assert predict(prof, 500.0, links, 2, "cfg+sp", "nvlink")["time_s"] < two["time_s"]  # one exchange vs 56


def test_time_falls_with_p_until_communication_dominates():
    prof = _profile()
    fast = [predict(prof, 500.0, Links(nvlink_gbps=300.0), p, "sp", "nvlink")["time_s"] for p in (1, 2, 4, 8)]
    assert fast == sorted(fast, reverse=True)
    # across nodes at a slow link, the per-rank bytes fall only like (p - 1) / p^2: more ranks stop paying off
    slow = Links(nvlink_gbps=300.0, ib_gbps=1.0, ib_gpus_per_node=1)
    times = [predict(prof, 500.0, slow, p, "sp", "ib")["time_s"] for p in (1, 2, 4, 8)]
    assert times[1] > times[0]
    # only the steps that communicate pay for it: half the steps cached -> half the communication time
    half = _profile(comm=[True, False] * 5)
    full_comm = predict(prof, 500.0, slow, 2, "sp", "ib")["comm_s"]
    assert predict(half, 500.0, slow, 2, "sp", "ib")["comm_s"] == pytest.approx(full_comm / 2)


def test_inter_node_placement_sends_the_off_node_share_over_infiniband():
    links = Links(nvlink_gbps=400.0, ib_gbps=40.0, nvlink_latency_us=0.0, ib_latency_us=0.0, ib_gpus_per_node=2)
    # 4 ranks, 2 per node: of the 3 peers 1 is on-node, 2 are off-node
    assert links.transfer_s(3e9, 4, "ib", 1) == pytest.approx(max(1e9 / 400e9, 2e9 / 40e9))
    assert links.transfer_s(3e9, 4, "nvlink", 1) == pytest.approx(3e9 / 400e9)


@pytest.mark.slow
def test_cli_prints_the_comparison_with_the_published_numbers(capsys):
    out = scaling.main(["--published-only", "--tflops", "125"])
    text = capsys.readouterr().out
    assert "published 547 s" in text and "published 244 s" in text and "predicted / published" in text
    figures = out["published_comparison"]
    assert figures["implied_tflops_from_1gpu"] == pytest.approx(figures["predicted_1gpu_s"] / 547 * 125, rel=1e-9)
    assert 1.0 < figures["predicted_speedup"] <= 2.0  # SP 2 cannot beat perfect scaling in this model
    assert figures["ratio_1gpu"] == pytest.approx(figures["predicted_1gpu_s"] / 547)


def test_a_file_that_is_not_a_gpu_check_json_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "other.json"
    bad.write_text('{"methods": {}}')
    with pytest.raises(SystemExit) as exc:
        scaling.main(["--kernel-times", str(bad), "--published-only"])
    assert exc.value.code == 2 and "not a gpu_check JSON" in capsys.readouterr().err
