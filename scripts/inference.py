"""Generate videos from prompts: `python scripts/inference.py --config configs/duca_480p.py --prompt "..."`
(or under `torchrun --nproc_per_node 1`). Flags are Open-Sora 1.2's; `--help` lists them.

Exit status: 0 every video is written (or was already complete), 1 some videos failed (listed in the
summary), 2 bad input (nothing generated), 130 interrupted. Under torchrun these are each worker's codes; the
launcher itself exits 0 when every worker did, else 1 (and prints its own failure report).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from duca_video.configs import ConfigError, config_from_args
from duca_video.io import PromptError
from duca_video.models import CheckpointMismatchError
from duca_video.models.checkpoint import CheckpointError
from duca_video.parallel.launch import close_parallel
from duca_video.pipeline import InputError, run


def _interrupt(signum: int, frame: object) -> None:
    # torchrun and job schedulers stop workers with SIGTERM: turn it into the same clean stop as Ctrl-C,
    # so half-written files are removed and the summary of what is done is printed.
    raise KeyboardInterrupt(f"signal {signum}")


# Bad input, found before anything is generated: `error: ...` and exit status 2, never a traceback.
_INPUT_ERRORS = (ConfigError, InputError, PromptError, CheckpointError, CheckpointMismatchError, FileNotFoundError)


def _refuse(exc: BaseException) -> int:
    """Bad input: one `error:` line. Under torchrun every rank finds the same fault in the same input: rank 0
    alone says it, so the launcher's output holds one message, not one per rank interleaved."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {exc}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg, _ = config_from_args(argv)
    except _INPUT_ERRORS as exc:
        return _refuse(exc)
    except KeyboardInterrupt:  # Ctrl-C while a config file runs: nothing was started
        print("interrupted", file=sys.stderr)
        return 130
    logging.basicConfig(level=logging.WARNING if cfg.quiet else logging.INFO, format="%(message)s", force=True)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    # As upstream: TF32 matmuls on CUDA (no effect in bf16, ~3x faster fp32).
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        with logging_redirect_tqdm():
            summary = run(cfg)
    except _INPUT_ERRORS as exc:
        return _refuse(exc)
    except KeyboardInterrupt:  # while the models were loading (later, run() stops cleanly itself)
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if summary.writer:  # one summary per sequence-parallel group
        print(summary.format())
    return summary.exit_code


if __name__ == "__main__":
    code = main()
    close_parallel(code)
    sys.exit(code)
