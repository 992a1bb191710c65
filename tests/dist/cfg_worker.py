"""Run under torchrun with --cfg-parallel semantics: the CFG halves on two ranks (and SP inside each half when the
world is 4). For several cache methods, writes one JSON per rank: max |parallel - one process| of the final latent,
the step kinds on this rank, and the collectives called during each step, by step kind."""

import json
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist

from duca_video import cache
from duca_video.parallel.cfg import parallelize_cfg
from duca_video.parallel.launch import init_parallel
from duca_video.parallel.sequence import disable_sequence_parallel, parallelize_stdit3
from tests.dist.sp_worker import inputs, sample, spy_collectives, tiny_model

METHODS = {"none": {}, "duca": {}, "toca": {}, "teacache": {"threshold": 0.3}, "taylorseer": {"interval": 3},
           "auto": {"schedule": "FFCRAMSFTR"}}


def main(out_dir: str, sp_size: int) -> None:
    ctx = init_parallel(sp_size, cfg_parallel=True)
    model, data = tiny_model(), inputs()
    calls: list[tuple[str, str]] = []
    controller = None
    spy_collectives(calls, lambda: controller)

    report = {"rank": ctx.rank, "world": ctx.world_size, "cfg_rank": ctx.cfg_rank, "methods": {}}
    for method, extra in METHODS.items():
        disable_sequence_parallel(model)
        controller = cache.enable(model, method, **extra)
        single = sample(model, data)
        single_kinds = [h["kind"] for h in controller.history]
        sp = parallelize_stdit3(model, ctx.sp_group, gather_output=False) if ctx.sp_size > 1 else None
        calls.clear()
        controller = cache.enable(model, method, **extra)
        halves = parallelize_cfg(model, ctx.cfg_group)  # last: over anything else that wraps the forward
        out = sample(model, data)
        halves.remove()
        if sp is not None:
            out = sp.gather_latents(out, model.config.patch_size)
        report["methods"][method] = {
            "max_diff": (out - single).abs().max().item(),
            "kinds": [h["kind"] for h in controller.history], "single_kinds": single_kinds,
            "calls_by_step": {f"{kind}|{name}": n for (name, kind), n in Counter(calls).items()},
        }
    Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
