"""Calibrate `--cache auto` for a model, size and step count: measure the errors its solver predicts from.

    python -m duca_video.cache.calibrate --config configs/tiny.py --prompts 8 --held-out 8 \\
        --out weights/tiny/auto.json [any scripts/inference.py flag, e.g. --num-sampling-steps 30]

For each batch of N prompts (flags as scripts/inference.py's; see `prompt_sets` for which prompts):
1. the uncached sample runs through the real pipeline, and every step's model input is recorded;
2. from the uncached latent at every step i, each pattern p (A, R, C, M, S, T, CA, CR) runs as a segment "F" + p p p ..
   for up to `--max-span` steps through the real cache engine: the RMS distance of the latent to the uncached
   one after m of its steps is err[p][i][m];
3. a deviation of the latent at step j (the one a single A step leaves) is carried to the end uncached: the
   share left is gain[j];
4. each letter's FLOPs relative to a full step are counted on the model, and its time measured.
`--held-out H` then checks the error model on H other prompts: schedules solved for several speed-ups and fixed
ones run whole, and their measured error is compared with the prediction (rank correlation, error in dB).
Cost (printed and in the file): per batch, in model forwards, N + patterns x (N + sum of spans) + N^2 / 2; in
FLOPs about 10 uncached samples' worth at the defaults (A / R steps cost ~nothing). Finished batches are kept in
OUT.partial, so a run stopped and started again with the same flags continues; the file is written atomically.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..sampling.events import SampleStart, StepStart
from . import disable, enable
from .calibration_check import check_error_model
from .methods.auto_solver import FORMAT, LETTERS

PATTERNS = ("A", "R", "C", "M", "S", "T", "CA", "CR")
PROG = "python -m duca_video.cache.calibrate"
_COST_FORWARDS = 2 * (len(LETTERS) - 1) * 4  # letter_costs: steps 0 and 1, counted once and timed 3 times


class Trajectory:
    """One batch's uncached run: the model's inputs at every step, the latent before every step and at the end."""

    def __init__(self, model: torch.nn.Module, cfg_scale: float, videos: int) -> None:
        self.model, self.scale, self.videos = model, cfg_scale, videos
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] = []
        self.outputs: list[torch.Tensor] = []

    def record(self, run: Any) -> None:
        """Run `run()` (the pipeline's generate) with the model's calls recorded."""
        pre = self.model.register_forward_pre_hook(self._pre, with_kwargs=True)
        post = self.model.register_forward_hook(lambda _m, _a, out: self.outputs.append(out))
        try:
            run()
        finally:
            pre.remove()
            post.remove()

    def _pre(self, _module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        x, t = args[0], args[1]
        self.calls.append((x.detach().clone(), t.detach().clone(), dict(kwargs)))

    @property
    def cfg(self) -> bool:
        return self.calls[0][0].shape[0] == 2 * self.videos

    @property
    def timesteps(self) -> list[float]:
        return [float(t[0]) for _, t, _ in self.calls]

    def dt(self, k: int) -> float:
        ts = self.timesteps
        return (ts[k] - (ts[k + 1] if k + 1 < len(ts) else 0.0)) / 1000.0

    def latent(self, k: int) -> torch.Tensor:
        """The uncached latent before step k (k = N: the final one)."""
        if k < len(self.calls):
            return self.calls[k][0][: self.videos].float()
        return self.latent(k - 1) + self.velocity(self.outputs[k - 1]) * self.dt(k - 1)

    def velocity(self, out: torch.Tensor) -> torch.Tensor:
        channels = self.latent(0).shape[1]
        pred = out[:, :channels].float()
        if not self.cfg:
            return pred
        cond, uncond = pred.chunk(2, dim=0)
        return uncond + self.scale * (cond - uncond)

    def step(self, k: int, z: torch.Tensor) -> torch.Tensor:
        """One step of the sampler from latent z at step k, with this batch's captions and sizes."""
        _, t, kwargs = self.calls[k]
        x = torch.cat([z, z], 0) if self.cfg else z
        out = self.model(x.to(self.calls[k][0].dtype), t, **kwargs)
        return z + self.velocity(out) * self.dt(k)


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per video: the root mean square of a - b."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


def run_schedule(traj: Trajectory, letters: str, start: int, seeds: tuple[int, ...]) -> list[torch.Tensor]:
    """From the uncached latent at `start`, run `letters` through the cache engine; the latent after each step."""
    controller = enable(traj.model, "auto", schedule=letters)
    n, ts = len(letters), traj.timesteps
    z, out = traj.latent(start), []
    try:
        controller.on_sample_start(SampleStart(n, tuple(ts[start : start + n]), traj.videos, traj.cfg, None, seeds))
        for k in range(n):
            controller.on_step_start(StepStart(k, n, ts[start + k]))
            z = traj.step(start + k, z)
            out.append(z)
    finally:
        controller.on_sample_end()
        disable(traj.model)
    return out


def segment_errors(traj: Trajectory, seeds: tuple[int, ...], span: int, bar: Any) -> dict[str, Any]:
    """err[p][i][m] summed over the batch's videos, and the deviation a single A step leaves at each step."""
    n = len(traj.calls)
    errors = {p: [[0.0] + [None] * (span - 1) for _ in range(n)] for p in PATTERNS}
    after_a: dict[int, torch.Tensor] = {}
    for i in range(n - 1):
        length = min(span, n - i)
        for p in PATTERNS:
            letters = "F" + (p * length)[: length - 1]
            latents = run_schedule(traj, letters, i, seeds)
            for m in range(1, length):
                errors[p][i][m] = float(rms(latents[m], traj.latent(i + 1 + m)).sum())
            if p == "A" and length > 1:
                after_a[i + 2] = latents[1] - traj.latent(i + 2)
            bar.update(length)
    return {"errors": errors, "after_a": after_a}


def gains(traj: Trajectory, deviations: dict[int, torch.Tensor], bar: Any) -> list[float]:
    """Per step j (summed over videos): |deviation left at the end| / |deviation at j|, run uncached."""
    n = len(traj.calls)
    out = [float(traj.videos)] * (n + 1)
    end = traj.latent(n)
    for j, delta in sorted(deviations.items()):
        if j >= n:
            continue
        z = traj.latent(j) + delta
        for k in range(j, n):
            z = traj.step(k, z)
        size = delta.pow(2).flatten(1).mean(1).sqrt().clamp_min(1e-12)
        out[j] = float((rms(z, end) / size).sum())
        bar.update(n - j)
    return out


def _two_steps(traj: Trajectory, letter: str, seeds: tuple[int, ...], measure: Any) -> list[Any]:
    """Steps 0 and 1 of the schedule "F" + letter, each run through `measure(step, k, z) -> (value, z)`."""
    controller = enable(traj.model, "auto", schedule="F" + letter)
    ts, values = traj.timesteps, []
    try:
        controller.on_sample_start(SampleStart(2, tuple(ts[:2]), traj.videos, traj.cfg, None, seeds))
        z = traj.latent(0)
        for k in range(2):
            controller.on_step_start(StepStart(k, 2, ts[k]))
            value, z = measure(traj.step, k, z)
            values.append(value)
    finally:
        controller.on_sample_end()
        disable(traj.model)
    return values


def _timed(step: Any, k: int, z: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    z = step(k, z)
    return time.perf_counter() - start, z


def letter_costs(traj: Trajectory, seeds: tuple[int, ...], repeats: int = 3) -> dict[str, dict[str, float]]:
    """Each letter's step relative to a full one: its FLOPs (counted) and its time on this machine (median of
    `repeats`, measured after the count's warm-up run)."""
    from ..metrics.flops import count_flops

    flops, times = {"F": 1.0}, {"F": 1.0}
    for c in LETTERS[1:]:
        counted = _two_steps(traj, c, seeds, count_flops)
        flops[c] = counted[1] / counted[0]
        runs = [_two_steps(traj, c, seeds, _timed) for _ in range(repeats)]
        times[c] = statistics.median(r[1] / r[0] for r in runs)
    return {"costs": flops, "times": times}


def calibrate_batch(models: Any, cfg: Any, jobs: list, span: int, bar: Any) -> dict[str, Any]:
    """Steps 1-4 of the module doc for one batch of prompts."""
    from .. import pipeline

    traj = Trajectory(models.model, cfg.scheduler.cfg_scale, len(jobs))
    traj.record(lambda: pipeline.generate(models, cfg, jobs, progress=False))
    seeds = tuple(j.seed for j in jobs)
    with torch.no_grad():
        measured = segment_errors(traj, seeds, span, bar)
        gain = gains(traj, measured["after_a"], bar)
        costs = letter_costs(traj, seeds)
    return {
        "videos": len(jobs),
        "errors": measured["errors"],
        "gain": gain,
        **costs,
        "timesteps": traj.timesteps,
    }


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The batches' sums as means over all videos."""
    videos = sum(p["videos"] for p in parts)
    first = parts[0]
    errors = {
        p: [
            [None if v is None else sum(part["errors"][p][i][m] for part in parts) / videos for m, v in enumerate(row)]
            for i, row in enumerate(first["errors"][p])
        ]
        for p in PATTERNS
    }
    gain = [sum(part["gain"][j] for part in parts) / videos for j in range(len(first["gain"]))]
    costs = {key: {c: sum(part[key][c] for part in parts) / len(parts) for c in LETTERS} for key in ("costs", "times")}
    return {"errors": errors, "gain": gain, **costs, "timesteps": first["timesteps"], "videos": videos}


def shown_path(path: str | None) -> str | None:
    """A weights path as the file records it: relative to the working folder when inside it (a shipped
    calibration should not name the machine it was made on), else as given."""
    if not path:
        return path
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def forwards_per_batch(n: int, span: int) -> int:
    """Model forwards one batch costs: the uncached run, the segments, the gain runs."""
    segments = sum(min(span, n - i) for i in range(n - 1)) * len(PATTERNS)
    return n + segments + sum(n - j for j in range(2, n)) + _COST_FORWARDS


def _load_partial(path: Path, key: dict[str, Any]) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return data["parts"] if data.get("key") == key else []


_BENCHMARK_PROMPTS = 64  # scripts/benchmark.py's most (the first ones of the testbed's seeded caption order)


def prompt_sets(cfg: Any, count: int, held_out: int) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """Calibration and check prompts, disjoint. --prompt / --prompt-path: the first `count`, then the next
    `held_out`. A testbed config: the last `count` captions of the benchmark's seeded order, the `held_out` before
    them; the benchmark takes the first ones, so neither set meets its prompts."""
    from ..jobs import load_prompts
    from ..testbed.evaluate import balanced_prompts

    if cfg.prompt or cfg.prompt_path:
        prompts = load_prompts(cfg)
        if len(prompts) < count + held_out:
            raise ValueError(f"{len(prompts)} prompt(s) given; --prompts {count} + --held-out {held_out} need more")
        return prompts[:count], prompts[count : count + held_out]
    if cfg.text_encoder.type != "word":
        raise ValueError("pass --prompt-path FILE (or --prompt ...) with the prompts to calibrate on")
    order = list(dict.fromkeys(balanced_prompts(4096, 0)))  # every caption once, in the benchmark's order
    free = len(order) - _BENCHMARK_PROMPTS
    if count + held_out > free:
        raise ValueError(f"--prompts + --held-out can be at most {free} on the testbed (it has {len(order)} captions)")
    tail = order[len(order) - count - held_out :]
    return list(enumerate(tail[held_out:])), list(enumerate(tail[:held_out]))


def calibrate(argv: Sequence[str], count: int, held_out: int, span: int, out: str) -> dict:
    """Everything the file holds (see the module doc); batches done are kept in OUT.partial as they finish."""
    from .. import pipeline
    from ..configs import config_from_args
    from ..configs.preflight import resolve_device, resolve_weights
    from ..io import atomic_write_json
    from ..jobs import batch_jobs, plan_batches

    cfg, _ = config_from_args([*argv, "--cache", "none"])
    cfg.count_flops = False
    prompts, check_prompts = prompt_sets(cfg, count, held_out)
    jobs = [j for b in plan_batches(cfg, prompts) for j in b]
    models = pipeline.load_models(cfg, resolve_weights(cfg), resolve_device(cfg.device))
    batches = list(batch_jobs(jobs, cfg.batch_size))
    n = cfg.scheduler.num_sampling_steps
    partial, key = Path(out + ".partial"), {"argv": list(argv), "prompts": count, "span": span}
    parts = _load_partial(partial, key)
    bar = tqdm(total=len(batches) * (forwards_per_batch(n, span) - n - _COST_FORWARDS), desc="calibrate")
    bar.update(len(parts) * bar.total // max(1, len(batches)))
    for batch in batches[len(parts) :]:
        parts.append(calibrate_batch(models, cfg, batch, span, bar))
        atomic_write_json(str(partial), {"key": key, "parts": parts})
    bar.close()
    data = {
        "format": FORMAT,
        "num_steps": n,
        "recompute_ratio": 0.15,
        **merge(parts),
        "patterns": list(PATTERNS),
        "max_span": span,
        "model": shown_path(models.weights.get("model")),
        "image_size": list(cfg.size) if cfg.size is not None else None,
        "num_frames": cfg.num_frames,
        "cfg_scale": cfg.scheduler.cfg_scale,
        "dtype": cfg.dtype,
        "prompts": len(jobs),
        "prompt_texts": [j.text for j in jobs],
        "cost": {"forwards": forwards_per_batch(n, span) * len(batches), "forwards_of_one_sample": n},
        "made_by": f"{PROG} --prompts {count} --held-out {held_out} --max-span {span} " + " ".join(argv),
    }
    if held_out:
        data["check"] = check_error_model(data, models, cfg, check_prompts)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    from ..cli_checks import ToolParser, output_file, positive_int
    from ..io import atomic_write_json

    p = ToolParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=positive_int, default=8, help="calibration prompts (default 8)")
    p.add_argument("--held-out", type=int, default=0, help="other prompts to check the error model on (default 0)")
    p.add_argument("--max-span", type=positive_int, default=10, help="longest segment, in steps (default 10)")
    p.add_argument("--out", required=True, help="JSON file to write (atomically; its folder must exist)")
    args, rest = p.parse_known_args(argv)
    p.check(output_file, args.out, "--out")
    if args.held_out < 0 or args.max_span < 2:
        p.error("--held-out must be >= 0 and --max-span >= 2")
    try:
        data = calibrate(rest, args.prompts, args.held_out, args.max_span, args.out)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(args.out, data)
    Path(args.out + ".partial").unlink(missing_ok=True)
    check = data.get("check", {})
    print(
        f"wrote {args.out}: {data['num_steps']} steps, {data['prompts']} prompts, {data['cost']['forwards']} forwards"
        + (f"; held-out rank correlation {check['spearman']:.3f}" if check else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["PATTERNS", "Trajectory", "calibrate", "main", "run_schedule"]
