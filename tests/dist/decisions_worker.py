"""Run under torchrun: a method that decides from the data (First-Block Cache, EasyCache, ...) on the tiny model,
one process vs sequence parallel over the group: `decisions_worker.py OUT_DIR METHOD THRESHOLD [KEY=INT ...]`.

Writes one JSON per rank: each run's step kinds and signals, and max |SP - single| of the final latent. 15
spatial tokens, so the SP split pads (the signal must leave the padding out).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from duca_video import cache
from duca_video.models import STDiT3, STDiT3Config
from duca_video.parallel.launch import init_parallel
from duca_video.parallel.sequence import disable_sequence_parallel, parallelize_stdit3
from duca_video.sampling.rflow import RFlowSampler


def tiny_model() -> STDiT3:
    torch.manual_seed(0)
    model = STDiT3(STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model.eval()


def sample(model: STDiT3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, 8, dtype=torch.long)
    mask[0, :3], mask[1, :7] = 1, 1
    z, y = torch.randn(2, 4, 3, 6, 10, generator=g), torch.randn(2, 1, 8, 32, generator=g)  # 3x5 tokens per frame
    kwargs = dict(fps=torch.full((2,), 24.0), height=torch.full((2,), 48.0), width=torch.full((2,), 80.0))
    sampler = RFlowSampler(num_sampling_steps=12, use_timestep_transform=False, cfg_scale=4.0)
    y_null = model.y_embedder.y_embedding[None, None].expand(2, 1, 8, 32)
    return sampler.sample(model, z, y, y_null, mask, model_kwargs=kwargs, progress=False, seed=3)


def main(out_dir: str, method: str, threshold: float, **options: int) -> None:
    ctx = init_parallel()
    model = tiny_model()
    runs = {}
    for name in ("single", "sp"):
        disable_sequence_parallel(model)
        sp = parallelize_stdit3(model, ctx.sp_group, gather_output=False) if name == "sp" else None
        controller = cache.enable(model, method, threshold=threshold, **options)
        out = sample(model)
        if sp is not None:
            out = sp.gather_latents(out, model.config.patch_size)
        runs[name] = {"latent": out, "kinds": [h["kind"] for h in controller.history],
                      "signals": [h.get("signal") for h in controller.history]}
    report = {"rank": ctx.rank, "world": ctx.world_size,
              "max_diff": (runs["sp"]["latent"] - runs["single"]["latent"]).abs().max().item(),
              **{f"{k}_{name}": r[k] for name, r in runs.items() for k in ("kinds", "signals")}}
    Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), **{k: int(v) for k, v in (a.split("=") for a in sys.argv[4:])})
