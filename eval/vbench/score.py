"""Score a generated suite with VBench: the 16 dimensions, one dimension per process, spread over the GPUs given.

    python eval/vbench/score.py --videos samples/vbench/duca --score-dir scores/duca --gpus 0,1,2,3 --local
    python eval/vbench/score.py ... --dry-run          # prints the commands, runs and creates nothing

Runs in VBench's own environment (eval/vbench/README.md), or anywhere with `--python` pointing at that
environment's interpreter; this file itself needs only the standard library. What it does:
1. checks that every `{prompt}-{k}.mp4` of the suite is in --videos (error naming the missing ones, unless
   --allow-missing: VBench itself only warns and scores what it finds);
2. makes SCORE_DIR/videos, a folder of links to those mp4 files only: VBench takes the file extension from
   whichever file os.listdir() returns first, and our video folders also hold the .json records;
3. with --local, checks that the files each dimension reads are in their caches ($VBENCH_CACHE_DIR, default
   ~/.cache/vbench; torch hub's; Hugging Face's: eval/vbench/offline.py) and runs the workers with the Hugging
   Face hub offline, so nothing is downloaded;
4. assigns the dimensions to the GPUs (longest first, to the least loaded GPU; each GPU runs its dimensions one
   after another) and runs each as `score.py --worker` with CUDA_VISIBLE_DEVICES set, logging to
   SCORE_DIR/logs/DIMENSION.log; with --device cpu, one after another on the CPU. VBench writes
   SCORE_DIR/DIMENSION_eval_results.json. A dimension counts as scored, and is skipped unless --force, only when
   that file holds a finite score in [0, 1] whose per-video results cover every video the suite lists for it;
   otherwise it is scored again and the reason printed. SCORE_DIR/suite.json records the suite for tabulate.py.
Then: python eval/vbench/tabulate.py --score-dir SCORE_DIR
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import `eval.` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from eval.common import EvalError
from eval.vbench.cli import Parser, check_output_dir, nonempty, positive_int, run_script, say
from eval.vbench.offline import cache_dir, missing_offline_files
from eval.vbench.protocol import (
    CPU_DIMENSIONS,
    DIMENSIONS,
    NUM_SAMPLES,
    RELATIVE_COST,
    dimension_videos,
    find_full_info,
    load_suite,
    plan_videos,
)
from eval.vbench.results import unscored_reason, write_suite_record

SCRIPT = Path(__file__).resolve()
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Job:
    dimension: str
    gpu: str  # a CUDA device id, or "cpu"
    argv: list[str]
    env: dict[str, str]  # set on top of the inherited environment
    log: Path

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)} > {shlex.quote(str(self.log))} 2>&1"


@dataclass(frozen=True)
class Plan:
    full_info: Path
    names: list[str]  # every suite video, `{prompt}-{k}`
    absent: set[str]  # suite videos not in --videos
    wanted: dict[str, frozenset[str]]  # {dimension: the videos the suite lists for it}
    dimensions: list[str]
    videos: Path
    score_dir: Path


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


def parse_gpus(text: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES items: device numbers (0, 1, ...) or GPU-/MIG- UUIDs."""
    gpus = parse_list(text, "--gpus")
    bad = [g for g in gpus if not re.fullmatch(r"\d+|(GPU|MIG)-[0-9A-Za-z/-]+", g)]
    if bad:
        raise EvalError(f"--gpus: {', '.join(map(repr, bad))} is not a device number (0, 1, ...) or a GPU-/MIG- UUID")
    return gpus


def assign(dimensions: Sequence[str], gpus: Sequence[str]) -> dict[str, list[str]]:
    """Longest-processing-time first: each dimension, costliest first, goes to the GPU with the least work."""
    load = {g: 0.0 for g in gpus}
    plan: dict[str, list[str]] = {g: [] for g in gpus}
    for dim in sorted(dimensions, key=lambda d: (-RELATIVE_COST[d], DIMENSIONS.index(d))):
        gpu = min(gpus, key=lambda g: (load[g], gpus.index(g)))
        plan[gpu].append(dim)
        load[gpu] += RELATIVE_COST[dim]
    return plan


def check_view(view: Path) -> None:
    """SCORE_DIR/videos may hold only the links score.py makes (checked before any work)."""
    if view.exists() and not view.is_dir():
        raise EvalError(f"{str(view)!r} is a file; VBench needs a folder of videos only: use another --score-dir")
    for entry in view.iterdir() if view.is_dir() else ():
        if not entry.is_symlink():
            raise EvalError(
                f"{str(view)!r} holds {entry.name!r}, which is not a link made by score.py; "
                "VBench needs a folder of videos only: use another --score-dir"
            )


def make_view(videos: Path, names: Sequence[str], view: Path) -> int:
    """SCORE_DIR/videos: a link per present suite video, nothing else. Returns the number of links."""
    check_view(view)
    view.mkdir(parents=True, exist_ok=True)
    for entry in view.iterdir():
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
    if args.device == "cpu":
        queues = {"cpu": sorted(dimensions, key=lambda d: (-RELATIVE_COST[d], DIMENSIONS.index(d)))}
    else:
        queues = assign(dimensions, parse_gpus(args.gpus or "0"))
    jobs = []
    for gpu, dims in queues.items():
        for dim in dims:
            argv = [
                args.python,
                str(SCRIPT),
                "--worker",
                "--dimension",
                dim,
                "--videos",
                str(score_dir / "videos"),
                "--score-dir",
                str(score_dir),
                "--full-info",
                str(full_info),
                "--num-samples",
                str(args.num_samples),
                "--device",
                args.device,
            ]
            argv += ["--local"] if args.local else []
            cuda = "" if gpu == "cpu" else gpu
            jobs.append(Job(dim, gpu, argv, {**env, "CUDA_VISIBLE_DEVICES": cuda}, score_dir / "logs" / f"{dim}.log"))
    return jobs


def _start(job: Job) -> tuple[Job, subprocess.Popen, Any]:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    log = open(job.log, "w")  # closed by run_jobs when the process ends
    proc = subprocess.Popen(job.argv, env={**os.environ, **job.env}, stdout=log, stderr=subprocess.STDOUT)
    say(f"{job.gpu if job.gpu == 'cpu' else 'gpu ' + job.gpu}: {job.dimension} started (log {job.log})")
    return job, proc, log


def _finished(job: Job, code: int, score_dir: Path, expected: frozenset[str]) -> str | None:
    """None when the worker scored its dimension over every video in `expected`; otherwise why not."""
    why = f"exit {code}" if code else unscored_reason(score_dir, job.dimension, expected)
    where = job.gpu if job.gpu == "cpu" else f"gpu {job.gpu}"
    say(f"{where}: {job.dimension} {'done' if why is None else 'FAILED'} (exit {code})")
    return None if why is None else f"{why}, see {job.log}"


def run_jobs(
    jobs: Sequence[Job], score_dir: Path, expected: dict[str, frozenset[str]], poll_s: float = 2.0
) -> list[tuple[str, str]]:
    """Each GPU runs its jobs one after another; the GPUs run side by side. Returns (dimension, why) failures."""
    queues: dict[str, list[Job]] = {}
    for job in jobs:
        queues.setdefault(job.gpu, []).append(job)
    running: dict[str, tuple[Job, subprocess.Popen, Any]] = {}
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
                why = _finished(job, proc.returncode, score_dir, expected.get(job.dimension, frozenset()))
                if why is not None:
                    failed.append((job.dimension, why))
    except KeyboardInterrupt:
        for _, proc, log in running.values():  # only the workers this run started
            proc.terminate()
            proc.wait()
            log.close()
        raise
    return failed


# ---------------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> int:
    """One dimension in this process, on the GPU that CUDA_VISIBLE_DEVICES leaves visible (VBench's API), or on
    the CPU with --device cpu; exit 0 only if its results cover every suite video in --videos."""
    if args.dimension not in DIMENSIONS or not args.full_info:
        print(f"error: --worker needs --dimension (one of {', '.join(DIMENSIONS)}) and --full-info", file=sys.stderr)
        return 2
    try:
        wanted = dimension_videos(load_suite(args.full_info), args.num_samples).get(args.dimension, frozenset())
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch
    from vbench import VBench

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: VBench needs a CUDA device; none is visible to this worker (or use --device cpu)", file=sys.stderr
        )
        return 2
    VBench(torch.device(args.device), args.full_info, args.score_dir).evaluate(
        videos_path=args.videos,
        name=args.dimension,
        dimension_list=[args.dimension],
        local=args.local,
        read_frame=False,
        mode="vbench_standard",
        imaging_quality_preprocessing_mode="longer",
    )
    present = {p.name[: -len(".mp4")] for p in Path(args.videos).glob("*.mp4")}
    why = unscored_reason(Path(args.score_dir), args.dimension, wanted & present)
    if why is not None:
        print(f"{args.dimension} not scored: {why}", file=sys.stderr)
    return 0 if why is None else 1


# ---------------------------------------------------------------------------------------------------- command
CPU_HELP = (
    f"cuda (default): one worker per GPU of --gpus; cpu: one after another on the CPU, for the dimensions "
    f"whose VBench 0.1.5 code has no hard CUDA requirement ({', '.join(CPU_DIMENSIONS)}; not "
    f"aesthetic_quality, whose head VBench loads without map_location), the default set with --device cpu"
)


def build_parser() -> Parser:
    p = Parser(prog="eval/vbench/score.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", required=True, type=nonempty, help="folder of the generated suite ({prompt}-{k}.mp4)")
    p.add_argument(
        "--score-dir", required=True, type=nonempty, help="folder for VBench's results, logs and the video links"
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=CPU_HELP)
    p.add_argument("--gpus", type=nonempty, help="comma-separated GPU ids, e.g. 0,1,2,3 (default 0; --device cuda)")
    p.add_argument("--dimensions", type=nonempty, help=f"comma-separated subset (default: all {len(DIMENSIONS)})")
    p.add_argument(
        "--full-info", type=nonempty, help="VBench_full_info.json (default: the one inside the installed vbench)"
    )
    p.add_argument("--num-samples", type=positive_int, default=NUM_SAMPLES, help="videos per prompt (VBench: 5)")
    p.add_argument("--local", action="store_true", help="checkpoints from the local caches only, offline")
    p.add_argument("--python", default=sys.executable, type=nonempty, help="interpreter of the VBench environment")
    p.add_argument("--allow-missing", action="store_true", help="score even if some suite videos are missing")
    p.add_argument("--force", action="store_true", help="re-score dimensions that already have results")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run and create nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dimension", help=argparse.SUPPRESS)
    return p


def choose_dimensions(args: argparse.Namespace) -> list[str]:
    if args.device == "cpu" and args.gpus:
        raise EvalError("--gpus applies to --device cuda; --device cpu runs on the CPU")
    if args.device == "cuda":
        parse_gpus(args.gpus or "0")
    if args.python != sys.executable and shutil.which(args.python) is None:
        raise EvalError(f"--python {args.python!r} is not an executable")
    if not args.dimensions:
        return list(CPU_DIMENSIONS if args.device == "cpu" else DIMENSIONS)
    dims = parse_list(args.dimensions, "--dimensions", DIMENSIONS)
    no_cpu = [d for d in dims if args.device == "cpu" and d not in CPU_DIMENSIONS]
    if no_cpu:
        raise EvalError(
            f"--device cpu: {', '.join(no_cpu)} needs CUDA in VBench 0.1.5; on the CPU: {', '.join(CPU_DIMENSIONS)}"
        )
    return dims


def prepare(args: argparse.Namespace) -> Plan:
    """Every input checked and the suite read: nothing is run or written yet."""
    dims = choose_dimensions(args)
    full_info = Path(args.full_info).resolve() if args.full_info else find_full_info()
    suite = load_suite(full_info)
    names = [v.name for v in plan_videos(suite, args.num_samples, 0)]
    videos, score_dir = Path(args.videos).resolve(), check_output_dir(args.score_dir, "--score-dir").resolve()
    if not videos.is_dir():
        raise EvalError(f"--videos {str(videos)!r} is not a folder")
    check_view(score_dir / "videos")
    absent = {n for n in names if not (videos / f"{n}.mp4").is_file()}
    if absent and not args.allow_missing:
        example = next(n for n in names if n in absent) + ".mp4"
        raise EvalError(
            f"{len(absent)} of the suite's {len(names)} videos are not in {str(videos)!r}, e.g. "
            f"{example!r}; finish eval/vbench/generate.py or pass --allow-missing"
        )
    wanted = dimension_videos(suite, args.num_samples)
    return Plan(full_info, names, absent, wanted, dims, videos, score_dir)


def to_score(args: argparse.Namespace, plan: Plan) -> tuple[list[str], list[str]]:
    """(dimensions already scored, dimensions to score), saying why each one with results is scored again."""
    done, todo = [], []
    for dim in plan.dimensions:
        why = "--force" if args.force else unscored_reason(plan.score_dir, dim, plan.wanted.get(dim, frozenset()))
        if why is None:
            done.append(dim)
            continue
        todo.append(dim)
        if why not in ("--force", "no results yet"):
            say(f"re-scoring {dim}: {why}")
    return done, todo


def dry_run(jobs: Sequence[Job], plan: Plan, missing: Sequence[str]) -> int:
    for path in missing:
        say(f"warning: --local: missing {path}")
    present = len(plan.names) - len(plan.absent)
    say(f"# would link the {present} suite videos into {plan.score_dir / 'videos'}, then run:")
    for gpu in dict.fromkeys(j.gpu for j in jobs):
        say(f"# {gpu if gpu == 'cpu' else 'gpu ' + gpu}, one after another:")
        for job in (j for j in jobs if j.gpu == gpu):
            say(job.shell())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        plan = prepare(args)
        missing = missing_offline_files(plan.dimensions) if args.local else []
        if missing and not args.dry_run:
            raise EvalError("--local: missing offline: " + ", ".join(missing))
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    say(f"suite: {len(plan.names)} videos, {len(plan.names) - len(plan.absent)} present in {plan.videos}")
    done, todo = to_score(args, plan)
    if done:
        say(f"already scored (skipped; --force to redo): {', '.join(done)}")
    jobs = plan_jobs(args, todo, plan.score_dir, plan.full_info)
    if args.dry_run:
        return dry_run(jobs, plan, missing)
    linked = make_view(plan.videos, plan.names, plan.score_dir / "videos")
    write_suite_record(plan.score_dir, plan.full_info, args.num_samples)
    say(f"linked {linked} videos into {plan.score_dir / 'videos'}")
    present = {d: v - plan.absent for d, v in plan.wanted.items()}
    try:
        failed = run_jobs(jobs, plan.score_dir, present)
    except KeyboardInterrupt:
        print("interrupted: running workers stopped", file=sys.stderr)
        return 130
    for dim, why in failed:
        print(f"FAILED {dim}: {why}", file=sys.stderr)
    say(f"next: python eval/vbench/tabulate.py --score-dir {shlex.quote(str(plan.score_dir))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
