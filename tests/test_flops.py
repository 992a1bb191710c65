import pytest
import torch

from duca_video.metrics.flops import count_flops, stdit3_forward_flops, video_latent_shape
from duca_video.models import STDiT3Config
from tests.helpers import real_and_replayed


def test_latent_shape_of_open_sora_sizes():
    assert video_latent_shape(51, 480, 854) == (15, 60, 106)
    assert video_latent_shape(102, 720, 1280) == (30, 90, 160)
    assert video_latent_shape(1, 480, 854) == (1, 60, 106)


def test_xl2_forward_at_480p_2s_is_about_56_5_tflops():
    flops = stdit3_forward_flops(STDiT3Config(), (15, 60, 106), (480, 854))
    assert abs(flops / 1e12 - 56.5) / 56.5 < 0.05


def test_flops_scale_with_batch_and_count_a_known_matmul():
    cfg = STDiT3Config(depth=1, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8)
    one = stdit3_forward_flops(cfg, (2, 8, 8), (64, 64), batch=1)
    two = stdit3_forward_flops(cfg, (2, 8, 8), (64, 64), batch=2)
    assert two == 2 * one
    a, b = torch.empty(3, 5, device="meta"), torch.empty(5, 7, device="meta")
    flops, _ = count_flops(torch.mm, a, b)
    assert flops == 2 * 3 * 5 * 7


@pytest.mark.slow
def test_meta_replay_counts_the_flops_of_the_real_loop():
    for method in ("none", "duca", "toca", "pab"):
        real, replayed, _ = real_and_replayed(method)
        assert replayed == real > 0, method


@pytest.mark.parametrize(
    "selector, age_bonus", [("k_norm", 0.0), ("cross_entropy", 0.0), ("max_similarity", 0.0), ("random", 0.1)]
)
def test_meta_replay_of_every_kind_of_token_choice(selector, age_bonus):
    # Scored, similarity and aged choices are made at the step from the data: on meta tensors they have a shape
    # and no values, which is all the count needs (the runtime code has no meta branch for them).
    real, replayed, _ = real_and_replayed("toca", selector=selector, age_bonus=age_bonus, recompute_ratio=0.25)
    assert replayed == real > 0


def test_meta_replay_repeats_teacaches_decisions_from_the_run():
    real, replayed, kinds = real_and_replayed("teacache", threshold=100)
    assert "aggressive" in kinds and "full" in kinds  # the threshold made it skip some steps, not all
    assert replayed == real
