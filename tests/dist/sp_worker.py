"""Run under torchrun: the tiny model with and without sequence parallelism, for several cache methods.

Writes one JSON per rank: max |SP - single process| of the final latent per method, and the collectives
called during each step, by step kind.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from duca_video import cache
from duca_video.models import STDiT3, STDiT3Config
from duca_video.models.vae import OpenSoraVAE
from duca_video.parallel.group_work import decode_across
from duca_video.parallel.launch import init_parallel
from duca_video.parallel.sequence import disable_sequence_parallel, parallelize_stdit3
from duca_video.sampling.rflow import RFlowSampler
from tests.helpers import TINY_SPATIAL, TINY_TEMPORAL

METHODS = {"none": {}, "duca": {}, "toca": {}, "fora": {}, "conservative": {}, "pab": {"threshold": (0.0, 2000.0)},
           "teacache": {"threshold": 0.3}, "taylorseer": {"interval": 3, "warmup_steps": 1, "order": 2},
           "duca_forecast": {}, "auto": {"schedule": "FFCRAMSFTR"}}


def tiny_model() -> STDiT3:
    torch.manual_seed(0)
    model = STDiT3(STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    for block in model.blocks:  # peaked text attention, so entropy scores are far apart (no near-ties)
        block.cross_attn.q_linear.weight.data.normal_(0, 1.0)
        block.cross_attn.kv_linear.weight.data.normal_(0, 1.0)
    return model.eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, 8, dtype=torch.long)
    mask[0, :3], mask[1, :7] = 1, 1  # text masks of different lengths
    # 6x10 latent, patch 2 -> 3x5 = 15 spatial tokens: divisible by neither 2 nor 4.
    return dict(z=torch.randn(2, 4, 3, 6, 10, generator=g), y=torch.randn(2, 1, 8, 32, generator=g), mask=mask,
                model_kwargs=dict(fps=torch.full((2,), 24.0), height=torch.full((2,), 48.0),
                                  width=torch.full((2,), 80.0)))


def sample(model, data):
    sampler = RFlowSampler(num_sampling_steps=10, use_timestep_transform=False, cfg_scale=4.0)
    y_null = model.y_embedder.y_embedding[None, None].expand(2, 1, 8, 32)
    return sampler.sample(model, data["z"], data["y"], y_null, data["mask"], model_kwargs=data["model_kwargs"],
                          progress=False, seed=3)


def spy_collectives(calls: list, controller_of) -> None:
    """Record every collective as (name, "step kind:spatial actions" of `controller_of()`'s step, or "outside")."""

    def spy(name, real):
        def wrapped(*args, **kwargs):
            controller = controller_of()
            plan = controller.plan if controller is not None else None
            calls.append((name, "outside" if plan is None else plan.kind + ":" + plan.short("spatial")))
            return real(*args, **kwargs)

        return wrapped

    for name in ("all_to_all_single", "all_gather", "all_reduce", "broadcast", "all_gather_into_tensor"):
        setattr(dist, name, spy(name, getattr(dist, name)))


def main(out_dir: str) -> None:
    ctx = init_parallel()
    model, data = tiny_model(), inputs()
    calls: list[tuple[str, str]] = []  # (collective, step kind at the time)
    controller = None
    spy_collectives(calls, lambda: controller)

    report = {"rank": ctx.rank, "world": ctx.world_size, "methods": {}}
    for method, extra in METHODS.items():
        disable_sequence_parallel(model)
        controller = cache.enable(model, method, **extra)
        single = sample(model, data)
        sp = parallelize_stdit3(model, ctx.sp_group, gather_output=False)
        calls.clear()
        controller = cache.enable(model, method, **extra)
        out = sp.gather_latents(sample(model, data), model.config.patch_size)
        kinds = Counter(kind for _, kind in calls)
        report["methods"][method] = {"max_diff": (out - single).abs().max().item(), "calls_by_step": dict(kinds),
                                     "history": [h["kind"] for h in controller.history]}
    # VAE decoding split over the group: 40 frames = 3 chunks (17, 17, 6), so with 4 ranks one has none.
    torch.manual_seed(0)
    vae = OpenSoraVAE.from_config(TINY_SPATIAL, TINY_TEMPORAL).eval()
    z = torch.randn(1, 4, vae.get_latent_size((40, None, None))[0], 4, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        split = decode_across(vae, z, 40, ctx)
        if ctx.is_writer:
            report["vae_max_diff"] = (split - vae.decode(z, num_frames=40)).abs().max().item()
        else:
            report["vae_max_diff"] = None if split is None else "non-writer got frames"
    Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
