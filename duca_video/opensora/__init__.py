"""Run upstream Open-Sora's own inference script with the cache plugin attached.

    python -m duca_video.opensora scripts/inference.py configs/opensora-v1-2/inference/sample.py \
        --prompt "a cat" --cache duca

i.e. the user's own Open-Sora command with `-m duca_video.opensora` before the script and `--cache` after it.
The script may also be left out (then it is DIR/scripts/inference.py, see --open-sora-root). Everything but our
own flags goes to upstream's script unchanged, so users keep their configs and flags; under `torchrun ... -m
duca_video.opensora ...` upstream's sequence parallelism runs as usual.
Our flags:
  --cache METHOD          a cache method of the registry (`--help` lists them all)
  --cache-opt KEY=VALUE   a setting of that method (repeatable), e.g. --cache-opt recompute_ratio=0.2
  --open-sora-root DIR    the Open-Sora checkout (default: the leading script's, else $OPEN_SORA_ROOT, else
                          the current directory)
  --script PATH           the script to run, instead of a leading one (default: DIR/scripts/inference.py)
A config may instead carry `cache = dict(method="duca", recompute_ratio=0.2)`; the flags win over it.

How it attaches: upstream's script builds its model and sampler with `opensora.registry.build_module`. That
function is wrapped before the script runs: the first STDiT3 it builds gets `duca_video.cache.enable(model,
method, scheduler=<the sampler it builds>, seed=<the config's seed>)`, which follows upstream's RFLOW.sample
from the model's forward calls. A run that asked for a cache and never built both fails with exit status 2.
"""

from .attach import Attachment, attach, main

__all__ = ["Attachment", "attach", "main"]
