"""Run under torchrun: FasterCache on the tiny model, one process vs sequence parallelism (gathered and sharded
outputs). Writes one JSON per rank: max |SP - single process| of the final latent, each run's per-step
(kind, model rows), and how often the CFG difference was summed over the group."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from duca_video import cache
from duca_video.parallel import comm
from duca_video.parallel.launch import init_parallel
from duca_video.parallel.sequence import disable_sequence_parallel, parallelize_stdit3
from tests.dist.sp_worker import inputs, sample, tiny_model

SETTINGS = dict(attn_start=3, cfg_start=4, cfg_interval=3, low_boost_until=6, high_boost_from=7)


def main(out_dir: str) -> None:
    ctx = init_parallel()
    model, data = tiny_model(), inputs()
    reduces: list[str] = []
    real_reduce = comm.all_reduce_sum

    def counted(x, group, stats, name="all_reduce"):
        reduces.append(name)
        return real_reduce(x, group, stats, name)

    # The method module imported the function by name: count the calls it makes.
    import duca_video.cache.methods.fastercache as fastercache

    fastercache.all_reduce_sum = counted

    def steps(controller):
        return [(h["kind"], h.get("model_rows")) for h in controller.history]

    report = {"rank": ctx.rank, "modes": {}}
    for mode, gather in (("gathered", True), ("sharded", False)):
        disable_sequence_parallel(model)
        controller = cache.enable(model, "fastercache", **SETTINGS)
        single = sample(model, data)
        single_history = steps(controller)
        sp = parallelize_stdit3(model, ctx.sp_group, gather_output=gather)
        controller = cache.enable(model, "fastercache", **SETTINGS)
        reduces.clear()
        out = sample(model, data)
        if not gather:
            out = sp.gather_latents(out, model.config.patch_size)
        report["modes"][mode] = {"max_diff": (out - single).abs().max().item(), "history": steps(controller),
                                 "single_history": single_history,
                                 "delta_reduces": reduces.count("fastercache_cfg_delta")}
    Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
