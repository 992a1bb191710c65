"""Run under torchrun: MagCache on a small random STDiT3 with and without sequence parallelism.

Writes one JSON per rank: max |SP - single process| of the final latent, both runs' step kinds, and how many
collectives the skipped steps called.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from duca_video import cache
from duca_video.parallel.launch import init_parallel
from duca_video.parallel.sequence import disable_sequence_parallel, parallelize_stdit3
from tests.dist.sp_worker import inputs, sample, tiny_model

RATIOS = (1.0, 0.9, 0.95, 0.99, 0.995, 1.0, 0.99, 0.98, 0.97, 0.85)  # 10 steps, 5 skipped (see the test)


def main(out_dir: str) -> None:
    ctx = init_parallel()
    model, data = tiny_model(), inputs()
    controller = None
    skipped_calls = []

    def spy(name, real):
        def wrapped(*args, **kwargs):
            if controller is not None and controller.plan is not None and controller.plan.kind == "aggressive":
                skipped_calls.append(name)
            return real(*args, **kwargs)

        return wrapped

    for name in ("all_to_all_single", "all_gather", "all_reduce", "broadcast", "all_gather_into_tensor"):
        setattr(dist, name, spy(name, getattr(dist, name)))

    disable_sequence_parallel(model)
    single_controller = cache.enable(model, "magcache", ratios=RATIOS)
    single = sample(model, data)
    sp = parallelize_stdit3(model, ctx.sp_group, gather_output=False)
    controller = cache.enable(model, "magcache", ratios=RATIOS)
    out = sp.gather_latents(sample(model, data), model.config.patch_size)
    report = {
        "rank": ctx.rank,
        "max_diff": (out - single).abs().max().item(),
        "single_history": [h["kind"] for h in single_controller.history],
        "sp_history": [h["kind"] for h in controller.history],
        "skipped_step_calls": len(skipped_calls),
    }
    Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
