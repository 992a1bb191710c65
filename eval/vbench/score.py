"""Score a generated suite with VBench: the 16 dimensions, one dimension per process, spread over the GPUs given.

    python eval/vbench/score.py --videos samples/vbench/duca --score-dir scores/duca --gpus 0,1,2,3 --local
    python eval/vbench/score.py ... --dry-run          # prints the commands, runs and creates nothing

Runs in VBench's own environment (eval/vbench/README.md), or anywhere with `--python` pointing at that
environment's interpreter; this file itself needs only the standard library. What it does:
1. checks that every `{prompt}-{k}.mp4` of the suite is in --videos (error naming the missing ones, unless
   --allow-missing: VBench itself only warns and scores what it finds);
2. makes SCORE_DIR/videos, a folder of links to those mp4 files only: VBench takes the file extension from
   whichever file os.listdir() returns first, and our video folders also hold the .json records;
3. with --local, checks that the checkpoints each dimension reads are in $VBENCH_CACHE_DIR (default
   ~/.cache/vbench) and runs the workers with the Hugging Face hub offline, so nothing is downloaded;
4. assigns the dimensions to the GPUs (longest first, to the least loaded GPU; each GPU runs its dimensions one
   after another) and runs each as `score.py --worker` with CUDA_VISIBLE_DEVICES set, logging to
   SCORE_DIR/logs/DIMENSION.log. VBench writes SCORE_DIR/DIMENSION_eval_results.json; a dimension whose
   results are already there is skipped unless --force.
Then: python eval/vbench/tabulate.py --score-dir SCORE_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import `eval.` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from eval.common import EvalError
from eval.vbench.protocol import (
    DIMENSIONS,
    LOCAL_FILES,
    NUM_SAMPLES,
    RELATIVE_COST,
    find_full_info,
    load_suite,
    plan_videos,
)

SCRIPT = Path(__file__).resolve()
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Job:
    dimension: str
    gpu: str
    argv: list[str]
    env: dict[str, str]  # set on top of the inherited environment
    log: Path

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)} > {shlex.quote(str(self.log))} 2>&1"


def parse_list(text: str, flag: str, allowed: Sequence[str] | None = None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise EvalError(f"{flag}: empty list")
    if len(set(items)) != len(items):
        raise EvalError(f"{flag} {text!r}: an item is given twice")
    bad = [x for x in items if allowed is not None and x not in allowed]
    if bad:
        raise EvalError(f"{flag}: unknown {', '.join(map(repr, bad))}; allowed: {', '.join(allowed)}")
    return items


def assign(dimensions: Sequence[str], gpus: Sequence[str]) -> dict[str, list[str]]:
    """Longest-processing-time first: each dimension, costliest first, goes to the GPU with the least work."""
    load = {g: 0.0 for g in gpus}
    plan: dict[str, list[str]] = {g: [] for g in gpus}
    for dim in sorted(dimensions, key=lambda d: (-RELATIVE_COST[d], DIMENSIONS.index(d))):
        gpu = min(gpus, key=lambda g: (load[g], gpus.index(g)))
        plan[gpu].append(dim)
        load[gpu] += RELATIVE_COST[dim]
    return plan


def has_results(score_dir: Path, dim: str) -> bool:
    try:
        return dim in json.loads((score_dir / f"{dim}_eval_results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def cache_dir() -> Path:
    return Path(os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench")


def missing_checkpoints(dimensions: Sequence[str], root: Path) -> list[str]:
    return sorted({str(root / f) for d in dimensions for f in LOCAL_FILES[d] if not (root / f).exists()})


def make_view(videos: Path, names: Sequence[str], view: Path) -> int:
    """SCORE_DIR/videos: a link per present suite video, nothing else. Returns the number of links."""
    view.mkdir(parents=True, exist_ok=True)
    for entry in view.iterdir():
        if not entry.is_symlink():
            raise EvalError(f"{str(view)!r} holds {entry.name!r}, which is not a link made by score.py; "
                            "VBench needs a folder of videos only: use another --score-dir")  # fmt: skip
        entry.unlink()
    count = 0
    for name in names:
        target = videos / f"{name}.mp4"
        if target.is_file():
            (view / target.name).symlink_to(target.resolve())
            count += 1
    return count


def plan_jobs(args: argparse.Namespace, dimensions: Sequence[str], score_dir: Path, full_info: Path) -> list[Job]:
    env = {"CUDA_VISIBLE_DEVICES": "", "VBENCH_CACHE_DIR": str(cache_dir())}
    if args.local:
        env.update(OFFLINE_ENV)
    jobs = []
    for gpu, dims in assign(dimensions, parse_list(args.gpus, "--gpus")).items():
        for dim in dims:
            argv = [args.python, str(SCRIPT), "--worker", "--dimension", dim, "--videos", str(score_dir / "videos"),
                    "--score-dir", str(score_dir), "--full-info", str(full_info)]  # fmt: skip
            argv += ["--local"] if args.local else []
            jobs.append(Job(dim, gpu, argv, {**env, "CUDA_VISIBLE_DEVICES": gpu}, score_dir / "logs" / f"{dim}.log"))
    return jobs


def _start(job: Job) -> tuple[Job, subprocess.Popen, object]:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    log = open(job.log, "w")  # closed by run_jobs when the process ends
    proc = subprocess.Popen(job.argv, env={**os.environ, **job.env}, stdout=log, stderr=subprocess.STDOUT)
    print(f"gpu {job.gpu}: {job.dimension} started (log {job.log})", flush=True)
    return job, proc, log


def run_jobs(jobs: Sequence[Job], score_dir: Path, poll_s: float = 2.0) -> list[tuple[str, str]]:
    """Each GPU runs its jobs one after another; the GPUs run side by side. Returns (dimension, why) failures."""
    queues: dict[str, list[Job]] = {}
    for job in jobs:
        queues.setdefault(job.gpu, []).append(job)
    running: dict[str, tuple[Job, subprocess.Popen, object]] = {}
    failed = []
    try:
        while any(queues.values()) or running:
            for gpu, queue in queues.items():
                if gpu not in running and queue:
                    running[gpu] = _start(queue.pop(0))
            time.sleep(poll_s)
            for gpu, (job, proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[gpu]
                ok = proc.returncode == 0 and has_results(score_dir, job.dimension)
                print(f"gpu {gpu}: {job.dimension} {'done' if ok else 'FAILED'} (exit {proc.returncode})", flush=True)
                if not ok:
                    failed.append((job.dimension, f"exit {proc.returncode}, see {job.log}"))
    except KeyboardInterrupt:
        for _, proc, log in running.values():  # only the workers this run started
            proc.terminate()
            proc.wait()
            log.close()
        raise
    return failed


# ---------------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> int:
    """One dimension in this process, on the GPU that CUDA_VISIBLE_DEVICES leaves visible (VBench's API)."""
    import torch
    from vbench import VBench

    if not torch.cuda.is_available():
        print("error: VBench needs a CUDA device; none is visible to this worker", file=sys.stderr)
        return 2
    VBench(torch.device("cuda"), args.full_info, args.score_dir).evaluate(
        videos_path=args.videos,
        name=args.dimension,
        dimension_list=[args.dimension],
        local=args.local,
        read_frame=False,
        mode="vbench_standard",
        imaging_quality_preprocessing_mode="longer",
    )
    return 0 if has_results(Path(args.score_dir), args.dimension) else 1


# ---------------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/vbench/score.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", required=True, help="folder of the generated suite ({prompt}-{k}.mp4)")
    p.add_argument("--score-dir", required=True, help="folder for VBench's results, logs and the video links")
    p.add_argument("--gpus", default="0", help="comma-separated GPU ids, e.g. 0,1,2,3 (default 0)")
    p.add_argument("--dimensions", help=f"comma-separated subset (default: all {len(DIMENSIONS)})")
    p.add_argument("--full-info", help="VBench_full_info.json (default: the one inside the installed vbench)")
    p.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="videos per prompt (VBench: 5)")
    p.add_argument("--local", action="store_true", help="checkpoints from $VBENCH_CACHE_DIR only, offline")
    p.add_argument("--python", default=sys.executable, help="interpreter of the VBench environment")
    p.add_argument("--allow-missing", action="store_true", help="score even if some suite videos are missing")
    p.add_argument("--force", action="store_true", help="re-score dimensions that already have results")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run and create nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dimension", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        full_info = Path(args.full_info).resolve() if args.full_info else find_full_info()
        names = [v.name for v in plan_videos(load_suite(full_info), args.num_samples, 0)]
        dims = parse_list(args.dimensions, "--dimensions", DIMENSIONS) if args.dimensions else list(DIMENSIONS)
        videos, score_dir = Path(args.videos).resolve(), Path(args.score_dir).resolve()
        if not videos.is_dir():
            raise EvalError(f"--videos {str(videos)!r} is not a folder")
        absent = [n for n in names if not (videos / f"{n}.mp4").is_file()]
        if absent and not args.allow_missing:
            example = absent[0] + ".mp4"
            raise EvalError(f"{len(absent)} of the suite's {len(names)} videos are not in {str(videos)!r}, e.g. "
                            f"{example!r}; finish eval/vbench/generate.py or pass --allow-missing")  # fmt: skip
        unknown_checkpoints = missing_checkpoints(dims, cache_dir()) if args.local else []
        if unknown_checkpoints and not args.dry_run:
            raise EvalError("--local: missing in $VBENCH_CACHE_DIR: " + ", ".join(unknown_checkpoints))
        done = [d for d in dims if not args.force and has_results(score_dir, d)]
        jobs = plan_jobs(args, [d for d in dims if d not in done], score_dir, full_info)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print(f"suite: {len(names)} videos, {len(names) - len(absent)} present in {videos}")
    if done:
        print(f"already scored (skipped; --force to redo): {', '.join(done)}")
    if args.dry_run:
        for path in unknown_checkpoints:
            print(f"warning: --local: missing {path}")
        print(f"# would link the {len(names) - len(absent)} suite videos into {score_dir / 'videos'}, then run:")
        for gpu in dict.fromkeys(j.gpu for j in jobs):
            print(f"# gpu {gpu}, one after another:")
            for job in (j for j in jobs if j.gpu == gpu):
                print(job.shell())
        return 0
    linked = make_view(videos, names, score_dir / "videos")
    print(f"linked {linked} videos into {score_dir / 'videos'}")
    try:
        failed = run_jobs(jobs, score_dir)
    except KeyboardInterrupt:
        print("interrupted: running workers stopped", file=sys.stderr)
        return 130
    for dim, why in failed:
        print(f"FAILED {dim}: {why}", file=sys.stderr)
    print(f"next: python eval/vbench/tabulate.py --score-dir {shlex.quote(str(score_dir))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
