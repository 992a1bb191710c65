"""Check `auto`'s error model on held-out prompts: predicted against measured error of whole schedules.

Schedules: those the solver picks for several speed-ups, and fixed ones written in the same letters (DuCa-,
FORA-, TeaCache-like cycles). Each runs whole from the held-out prompts' noise through the cache engine; its
error is the RMS distance of the final latent to the uncached one (mean over videos). Reported: Spearman's rank
correlation between predicted and measured errors, and the prediction's error in dB (20 log10 of their ratio).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from .methods.auto_solver import Calibration, solve

SPEEDUPS = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
CYCLES = ("FCA", "FAA", "FRR", "FMM", "FCC", "FRRR", "FCACA", "FCRCR", "FR", "FRRRR")


def fixed_schedules(n: int, warmup: int = 3) -> list[tuple[str, str]]:
    """Fixed schedules (name, letters): `warmup` full steps, then a repeated cycle."""
    return [(f"fixed {cycle}", "F" * warmup + (cycle * n)[: n - warmup]) for cycle in CYCLES]


def calibration_of(data: dict[str, Any]) -> Calibration:
    """The in-memory calibration a file's content describes."""
    cal = Calibration(
        data["num_steps"], data["costs"], data["errors"], data["gain"], data["recompute_ratio"], "unsaved", "new"
    )
    cal.times = data.get("times")
    return cal


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    norm = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / norm if norm else 0.0


def _schedules(cal: Calibration) -> list[tuple[str, str]]:
    out = []
    for s in SPEEDUPS:
        try:
            out.append((f"auto {s:g}x", solve(cal, s, cal.num_steps).letters))
        except ValueError:
            continue
    out += fixed_schedules(cal.num_steps)
    return out


def check_error_model(data: dict[str, Any], models: Any, cfg: Any, prompts: list[tuple[int, str]]) -> dict[str, Any]:
    """Run every schedule on the held-out `prompts`; compare with the prediction."""
    from .. import pipeline
    from ..jobs import batch_jobs, plan_batches
    from .calibrate import Trajectory, rms, run_schedule

    cal = calibration_of(data)
    schedules = _schedules(cal)
    sums = [0.0] * len(schedules)
    jobs = [j for b in plan_batches(cfg, prompts) for j in b]
    batches = list(batch_jobs(jobs, cfg.batch_size))
    bar = tqdm(total=len(batches) * len(schedules), desc="check on held-out prompts", unit="schedule")
    for batch in batches:
        traj = Trajectory(models.model, cfg.scheduler.cfg_scale, len(batch))
        traj.record(lambda batch=batch: pipeline.generate(models, cfg, batch, progress=False))
        end, seeds = traj.latent(len(traj.calls)), tuple(j.seed for j in batch)
        with torch.no_grad():
            for k, (_, letters) in enumerate(schedules):
                sums[k] += float(rms(run_schedule(traj, letters, 0, seeds)[-1], end).sum())
                bar.update()
    bar.close()
    rows = []
    for (name, letters), total in zip(schedules, sums):
        measured, predicted = total / len(jobs), cal.predict(letters)
        rows.append(
            {
                "name": name,
                "schedule": letters,
                "flops_speedup": round(cal.num_steps / cal.cost(letters), 3),
                "predicted": predicted,
                "measured": measured,
            }
        )
    both = [r for r in rows if r["predicted"] is not None and r["measured"] > 0]
    db = [abs(20 * math.log10(r["predicted"] / r["measured"])) for r in both if r["predicted"] > 0]
    return {
        "prompts": len(jobs),
        "prompt_texts": [j.text for j in jobs],
        "spearman": spearman([r["predicted"] for r in both], [r["measured"] for r in both]),
        "median_abs_db": sorted(db)[len(db) // 2] if db else None,
        "rows": rows,
    }


__all__ = ["CYCLES", "SPEEDUPS", "check_error_model", "fixed_schedules", "spearman"]
