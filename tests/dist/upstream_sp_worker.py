"""Run under torchrun (gloo): upstream Open-Sora's own sequence parallelism with the cache plugin attached.

Every rank builds the same tiny upstream STDiT3 twice from one state dict: once plainly (one process), once
with `enable_sequence_parallelism=True` and upstream's group set by `set_sequence_parallel_group(WORLD)`, as
upstream's scripts/inference.py does; both are sampled by upstream's RFLOW.sample. Writes one JSON per rank:
max |SP - one process| per method, the collectives called in each step by step kind, and the cache bytes.

Upstream's `_gather` (the all-gather before the final layer) asserts a CUDA tensor; on CPU ranks it is
replaced by the same all-gather + concatenation without that assertion. Everything else is upstream's code.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from duca_video import cache
from tests.upstream import (
    METHODS,
    import_upstream,
    open_sora_root,
    sample_upstream,
    tiny_inputs,
    tiny_upstream_model,
    upstream_rflow,
)

SP_METHODS = ("none", "duca", "toca", "teacache")


def gather_on_any_device(input_, pg, dim=-1):
    parts = [torch.empty_like(input_) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(parts, input_.contiguous(), group=pg)
    return torch.cat(parts, dim=dim).contiguous()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    up = import_upstream(open_sora_root())
    up.communications._gather = gather_on_any_device
    rflow, data = upstream_rflow(up), tiny_inputs()
    single = tiny_upstream_model(up)
    up.parallel_states.set_sequence_parallel_group(dist.group.WORLD)
    split = tiny_upstream_model(up, enable_sequence_parallelism=True)
    split.load_state_dict(single.state_dict())

    calls: list[str] = []
    controller = None

    def spy(name, real):
        def wrapped(*args, **kwargs):
            step = controller.history[-1]["kind"] if controller is not None and controller.plan is not None else "-"
            calls.append(f"{step}:{name}")
            return real(*args, **kwargs)

        return wrapped

    for name in ("all_to_all", "all_to_all_single", "all_gather", "all_reduce", "broadcast", "all_gather_into_tensor"):
        setattr(dist, name, spy(name, getattr(dist, name)))

    report = {"rank": dist.get_rank(), "world": dist.get_world_size(), "methods": {}}
    report["upstream_sp_uncached_diff"] = (sample_upstream(rflow, split, data)
                                           - sample_upstream(rflow, single, data)).abs().max().item()
    for method in SP_METHODS:
        extra = METHODS[method]
        controller = cache.enable(single, method, scheduler=rflow, **extra)
        one = sample_upstream(rflow, single, data)
        one_bytes = controller.cache_bytes
        calls.clear()
        controller = cache.enable(split, method, scheduler=rflow, **extra)
        out = sample_upstream(rflow, split, data)
        report["methods"][method] = {
            "max_diff": (out - one).abs().max().item(),
            "calls": dict(Counter(calls)),
            "history": [h["kind"] for h in controller.history],
            "cache_bytes": controller.cache_bytes,
            "one_process_cache_bytes": one_bytes,
        }
        cache.disable(split)
        cache.disable(single)
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
