"""Generate VBench's prompt suite with our pipeline: `{prompt}-{k}.mp4` (+ the per-video `.json` record) for every
distinct prompt of VBench_full_info.json and k = 0..4.

    python eval/vbench/generate.py --config configs/duca_480p.py --save-dir samples/vbench/duca --shard 0/8
    python eval/vbench/generate.py --full-info VBench_full_info.json --list        # names only, no model

- Seeds: sample k of every prompt uses SEED + k, SEED being the config's `seed` (or `--seed`); recorded in each
  video's JSON and in the manifest. The same name gets the same seed in every method's run.
- Duplicates: the suite has 946 entries but 944 distinct prompts; each distinct file is generated once (4,720).
- Resumable: a video whose mp4 and JSON are both there is skipped (the JSON is written last); a killed job
  leaves no partial file under a final name, and its temporary files are removed by the next run.
- Shards: `--shard I/N` takes the I-th of N contiguous blocks of the suite-ordered file list (0-based, sizes
  differing by at most one); the N shards are disjoint and together cover the suite. Run them as separate jobs
  on one shared save folder.
- Manifest: SAVE_DIR/manifest.json (manifest.shard-I-of-N.json for a shard), rewritten at the end of every run,
  lists each planned video with its status, seed, latency_s and dit_tflops read from its JSON record. Once all
  shards are done, a run without --shard generates nothing and writes the manifest of the whole suite.
- Every other flag is scripts/inference.py's (--cache, --num-sampling-steps, --resolution, --ckpt-path, --seed,
  --save-dir, --batch-size, ...). Prompt selection flags are the suite's and are refused.

Exit status: 0 all planned videos are complete, 1 some failed, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real imports are lazy: --list must not pull in torch
    from duca_video.configs import InferenceConfig
    from duca_video.jobs import RunSummary

if __package__ in (None, ""):  # run as a file: import `eval.` from the repository root, not from this folder
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from eval.common import EvalError, atomic_write_json, mean, read_record
from eval.vbench.cli import Parser, check_output_file, nonempty, positive_int, run_script, say
from eval.vbench.protocol import (
    NUM_SAMPLES,
    Shard,
    SuiteVideo,
    find_full_info,
    load_suite,
    parse_shard,
    plan_videos,
    select_shard,
    suite_digest,
)

log = logging.getLogger("eval.vbench.generate")

# Inference flags whose job the suite does: dest -> flag.
SUITE_FLAGS = {
    "prompt": "--prompt",
    "prompt_path": "--prompt-path",
    "start_index": "--start-index",
    "end_index": "--end-index",
    "num_sample": "--num-sample",
    "prompt_as_path": "--prompt-as-path",
    "sample_name": "--sample-name",
}
SEED_RULE = "seed = base_seed + k for sample k (0-based) of every prompt"
SHARD_RULE = "I-th of N contiguous blocks of the suite-ordered list of distinct files, sizes differing by <= 1"


def build_parser() -> Parser:
    # allow_abbrev=False: inference's --num-sample must not silently match our --num-samples.
    p = Parser(
        prog="eval/vbench/generate.py",
        allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        epilog="All other flags are scripts/inference.py's and override the config (see its --help).",
    )
    p.add_argument("--config", type=nonempty, help="inference config (Python file); required unless --list")
    p.add_argument(
        "--full-info", type=nonempty, help="VBench_full_info.json (default: the one inside the installed vbench)"
    )
    p.add_argument("--num-samples", type=positive_int, default=NUM_SAMPLES, help="videos per prompt (VBench: 5)")
    p.add_argument("--shard", default="0/1", help="I/N: this job's share of the files (0-based), default 0/1")
    p.add_argument("--list", action="store_true", help="print the planned file names and exit (loads no model)")
    p.add_argument(
        "--manifest",
        type=nonempty,
        help="manifest path (default: SAVE_DIR/manifest.json or manifest.shard-I-of-N.json)",
    )
    return p


def plan(full_info: Path, num_samples: int, shard: Shard, base_seed: int = 0) -> list[SuiteVideo]:
    return select_shard(plan_videos(load_suite(full_info), num_samples, base_seed), shard)


# ---------------------------------------------------------------------------------------------------- generating
def generate_videos(cfg: InferenceConfig, videos: Sequence[SuiteVideo]) -> RunSummary:
    """The pipeline's job over the suite's own names and seeds (it skips complete videos, checks every input
    before loading a model, keeps going past a failed batch, and under torchrun splits the work into
    data-parallel groups and sequence-parallel ranks)."""
    from duca_video import pipeline
    from duca_video.jobs import VideoJob, encoder_text

    jobs = [
        VideoJob(v.prompt_index, v.prompt, encoder_text(cfg, v.prompt_index, v.prompt), v.k, v.seed, v.name)
        for v in videos
    ]
    return pipeline.run(cfg, jobs)


# ---------------------------------------------------------------------------------------------------- manifest
def build_manifest(
    videos: Sequence[SuiteVideo], save_dir: Path, failed: dict[str, str], header: dict[str, Any]
) -> dict[str, Any]:
    """Status of every planned video, with the measurements read back from its JSON record (so videos written by
    an earlier run of the job are reported too)."""
    rows = []
    for v in videos:
        row: dict[str, Any] = {"name": v.name, "prompt": v.prompt, "k": v.k, "seed": v.seed}
        record_path = save_dir / f"{v.name}.json"
        if (save_dir / f"{v.name}.mp4").is_file() and record_path.is_file():
            rec = read_record(record_path)
            row["status"] = "complete" if rec.get("seed") == v.seed else "seed_mismatch"
            if row["status"] == "seed_mismatch":  # made by another run with another seed; kept, not regenerated
                row["record_seed"] = rec.get("seed")
            row.update(
                {key: rec.get(key) for key in ("method", "latency_s", "dit_tflops", "peak_memory_bytes", "cache_bytes")}
            )
        elif v.name in failed:
            row.update(status="failed", error=failed[v.name])
        else:
            row["status"] = "missing"
        rows.append(row)
    done = [r for r in rows if r["status"] == "complete"]
    latencies = [r["latency_s"] for r in done]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("complete", "seed_mismatch", "failed", "missing")}
    summary = {
        "planned": len(rows),
        **counts,
        "mean_latency_s": mean(latencies),
        "total_latency_s": sum(x for x in latencies if x is not None),
        "mean_dit_tflops": mean(r["dit_tflops"] for r in done),
    }
    return {**header, "summary": summary, "videos": rows}


def manifest_header(
    full_info: Path, suite: Sequence[Any], num_samples: int, files: int, cfg: InferenceConfig, shard: Shard, own: int
) -> dict[str, Any]:
    """The manifest's description of the run: the suite, the seed and shard rules, the config."""
    return {
        "suite": {
            "full_info": str(full_info),
            "sha256": suite_digest(full_info),
            "entries": len(suite),
            "distinct_prompts": len({e.prompt for e in suite}),
            "num_samples": num_samples,
            "files": files,
        },
        "seed_rule": SEED_RULE,
        "base_seed": cfg.seed,
        "shard": {"index": shard.index, "count": shard.count, "rule": SHARD_RULE, "files": own},
        "config": {k: v for k, v in cfg.to_dict().items() if k not in SUITE_FLAGS},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def manifest_path(save_dir: Path, shard: Shard, given: str | None) -> Path:
    if given:
        return Path(given)
    if shard.count == 1:
        return save_dir / "manifest.json"
    return save_dir / f"manifest.shard-{shard.index}-of-{shard.count}.json"


# ---------------------------------------------------------------------------------------------------- command
def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # SIGTERM from a scheduler: stop cleanly, write the manifest


def load_inference_config(config: str, rest: Sequence[str]) -> InferenceConfig:
    from duca_video.configs import build_parser as inference_parser
    from duca_video.configs import load_config

    parser = inference_parser()
    parser.prog = "eval/vbench/generate.py (inference flags)"
    args = parser.parse_args(["--config", config, *rest])
    given = [flag for dest, flag in SUITE_FLAGS.items() if getattr(args, dest) is not None]
    if given:
        raise EvalError(
            f"{', '.join(given)}: the prompts, names and samples come from the suite; remove "
            f"{'it' if len(given) == 1 else 'them'} (--num-samples sets the videos per prompt)"
        )
    return load_config(config, args)


def _check_generation_args(args: Any) -> None:
    if not args.config:
        raise EvalError("--config FILE is required to generate (or pass --list to print the names)")
    if not Path(args.config).is_file():
        raise EvalError(f"--config {args.config!r} is not a file")
    if args.manifest:  # written at the end: refused now rather than after the videos
        check_output_file(args.manifest, "--manifest")


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    try:
        shard = parse_shard(args.shard)
        full_info = Path(args.full_info) if args.full_info else find_full_info()
        if args.list:  # before anything heavy is imported: names only
            for v in plan(full_info, args.num_samples, shard):
                say(f"{v.name}.mp4")
            return 0
        _check_generation_args(args)
        suite = load_suite(full_info)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from duca_video.configs import ConfigError
    from duca_video.io import PromptError
    from duca_video.models import CheckpointMismatchError
    from duca_video.pipeline import InputError

    try:
        cfg = load_inference_config(args.config, rest)
        everything = plan_videos(suite, args.num_samples, cfg.seed)
        videos = select_shard(everything, shard)
    except (EvalError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if cfg.quiet else logging.INFO, format="%(message)s", force=True)
    save_dir = Path(cfg.save_dir)
    log.info("shard %s: %d of the suite's %d files -> %s", shard, len(videos), len(everything), save_dir)

    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        summary = generate_videos(cfg, videos)
    except (ConfigError, InputError, PromptError, CheckpointMismatchError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while the models were loading: nothing was written
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    header = manifest_header(full_info, suite, args.num_samples, len(everything), cfg, shard, len(videos))
    save_dir.mkdir(parents=True, exist_ok=True)
    path = manifest_path(save_dir, shard, args.manifest)
    atomic_write_json(path, build_manifest(videos, save_dir, dict(summary.failed), header))
    say(summary.format())
    say(f"manifest: {path}")
    return summary.exit_code


if __name__ == "__main__":
    code = run_script(main)
    if "torch.distributed" in sys.modules:  # a job ran (--list never imports torch): end its process groups
        from duca_video.parallel.launch import close_parallel

        close_parallel(code)
    sys.exit(code)
