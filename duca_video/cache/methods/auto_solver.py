"""The error model and the solver behind `auto`: which schedule of a FLOP budget is predicted closest to uncached.

A schedule is a path of full steps 0 = i_0 < i_1 < ... < i_m = N (N = the run's steps); between two full steps i
and j the steps i+1 .. j-1 repeat one *pattern* of cheaper letters (e.g. "R" = R R R, "CA" = C A C A). The
error model is the calibration's (`python -m duca_video.cache.calibrate`):

  err[p][i][m]  how far the latent is from the uncached one after a segment (full step i, then m steps of
                pattern p), started from the uncached latent at step i: RMS over the latent, mean over prompts;
  gain[j]       how much of a deviation of the latent at step j is left at the end of the uncached run;

and the predicted error of a schedule is the sum over its segments of gain[end] x err (an upper bound of the
final deviation when the segments' errors neither cancel nor grow together). Each letter costs a fraction of a
full step's FLOPs (`costs`, measured by the calibration's FLOP count). The solver finds the path with the least
predicted error within N / speedup full steps' FLOPs: a shortest path over (step, budget used), exact up to the
budget grid of 1/1000 of a full step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LETTERS = "FCMARST"
BUILTIN = "opensora12-magcache"
FORMAT = "duca-video auto calibration"
_GRID = 1000  # budget units per full step
# FLOPs of a stack-skipping step (embedders, final layer, CFG mix) relative to a full one, for STDiT3-XL/2 at 480p,
# 51 frames, counted on the meta device (tests/test_method_auto.py::test_the_builtin_skip_cost_is_the_counted_one).
_OPEN_SORA_12_SKIP_COST = 0.000111
_RETENTION = 0.2  # MagCache's default: the first 20% of the steps always compute (its ratios say little there)


@dataclass
class Calibration:
    """What the solver needs (see the module doc); `digest` identifies the source (part of the video identity)."""

    num_steps: int
    costs: dict[str, float]
    errors: dict[str, list[list[float | None]]]  # pattern -> [i][m] (m inner steps), None where it overruns N
    gain: list[float]  # j = 0 .. N
    recompute_ratio: float
    digest: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    times: dict[str, float] | None = None  # each letter's time relative to a full step, where measured
    units: str = "RMS distance of the final latent to the uncached one; an upper bound"

    @property
    def max_span(self) -> int:
        return max(len(rows[0]) for rows in self.errors.values())

    def segment_error(self, pattern: str, i: int, m: int) -> float | None:
        if m == 0:
            return 0.0
        value = self.errors[pattern][i][m] if m < len(self.errors[pattern][i]) else None
        return None if value is None else self.gain[i + 1 + m] * value

    def predict(self, letters: str) -> float | None:
        """The predicted error of a schedule written in letters; None where a segment is not in the model."""
        if len(letters) != self.num_steps or not letters.startswith("F"):
            return None
        total, starts = 0.0, [i for i, c in enumerate(letters) if c == "F"]
        for i, j in zip(starts, [*starts[1:], len(letters)]):
            err = self.predict_segment(letters[i:j], i)
            if err is None:
                return None
            total += err
        return total

    def predict_segment(self, part: str, start: int) -> float | None:
        """The predicted error of one segment: "F" + a pattern's letters, starting at step `start`."""
        inner = part[1:]
        pattern = next((p for p in self.errors if inner == (p * len(inner))[: len(inner)]), None)
        return None if pattern is None else self.segment_error(pattern, start, len(inner))

    def cost(self, letters: str, budget: str = "flops") -> float:
        return sum(self.prices(budget)[c] for c in letters)

    def prices(self, budget: str) -> dict[str, float]:
        """What each letter costs in full steps: its FLOPs, or its measured time."""
        if budget == "flops":
            return self.costs
        if self.times is None:
            raise ValueError(f"cache method 'auto': budget='time' needs measured times; {self.source} has none")
        return self.times


def load_calibration(source: str) -> Calibration:
    """A calibration file (checked), or the built-in Open-Sora 1.2 one from MagCache's published ratios."""
    if source == BUILTIN:
        return magcache_calibration()
    where = f"cache method 'auto': calibration={source!r}"
    path = Path(source).expanduser()
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except FileNotFoundError:
        raise ValueError(
            f"{where}: no such file; make one with `python -m duca_video.cache.calibrate --config CONFIG "
            f"--prompts N --out FILE.json`, or use {BUILTIN!r}"
        ) from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: not a readable JSON file ({exc})") from None
    problem = _check(data)
    if problem:
        raise ValueError(f"{where}: {problem}")
    import hashlib

    return Calibration(
        num_steps=data["num_steps"],
        costs={k: float(v) for k, v in data["costs"].items()},
        errors=data["errors"],
        gain=[float(g) for g in data["gain"]],
        recompute_ratio=float(data["recompute_ratio"]),
        digest=hashlib.sha256(raw).hexdigest(),
        source=str(path),
        times=data.get("times"),
        extra={k: data[k] for k in ("model", "image_size", "num_frames", "check") if k in data},
    )


def _check(data: Any) -> str | None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return f"not an auto calibration (its 'format' must be {FORMAT!r})"
    n = data.get("num_steps")
    if not isinstance(n, int) or n < 2:
        return "num_steps must be an int >= 2"
    costs = data.get("costs")
    if not isinstance(costs, dict) or set(costs) != set(LETTERS) or costs.get("F") != 1.0:
        return f"costs must give every letter of {LETTERS} (F = 1.0)"
    errors, gain = data.get("errors"), data.get("gain")
    if not isinstance(errors, dict) or not errors or any(set(p) - set(LETTERS) - {"F"} or "F" in p for p in errors):
        return "errors must map patterns of non-F letters to tables"
    if any(not isinstance(rows, list) or len(rows) != n for rows in errors.values()):
        return f"each errors table needs one row per step ({n})"
    if not isinstance(gain, list) or len(gain) != n + 1:
        return f"gain needs {n + 1} numbers (steps 0 .. {n})"
    if not isinstance(data.get("recompute_ratio"), (int, float)):
        return "recompute_ratio must be a number"
    return None


def magcache_calibration(num_steps: int = 30) -> Calibration:
    """Open-Sora 1.2 at 480p from the MagCache authors' ratios: only R segments, with MagCache's own error
    model (the accumulated |1 - product of ratios| over the skipped steps); the first 20% of steps compute."""
    from .magcache import OPEN_SORA_12_RATIOS, resample_ratios

    ratios = resample_ratios(OPEN_SORA_12_RATIOS, num_steps)
    first, span = max(1, int(_RETENTION * num_steps + 1e-9)), num_steps
    rows: list[list[float | None]] = []
    for i in range(num_steps):
        row: list[float | None] = [0.0]
        scale, error = 1.0, 0.0
        for m in range(1, span):
            k = i + m  # the m-th skipped step
            if k >= num_steps:
                row.append(None)
                continue
            scale *= ratios[k]
            error += abs(1.0 - scale)
            row.append(error if i + 1 >= first else math.inf)  # no skip before `first`
        rows.append(row)
    costs = {c: math.inf for c in LETTERS}
    costs.update(F=1.0, R=_OPEN_SORA_12_SKIP_COST)
    units = "MagCache's accumulated |1 - product of ratios| over the skipped steps"
    return Calibration(
        num_steps,
        costs,
        {"R": rows},
        [1.0] * (num_steps + 1),
        0.15,
        BUILTIN,
        BUILTIN,
        {"model": "STDiT3-XL/2"},
        units=units,
    )


@dataclass
class Solved:
    letters: str
    predicted: float
    cost: float  # in full steps
    speedup: float  # asked for
    calibration: Calibration
    budget: str = "flops"

    def describe(self) -> list[str]:
        """Where the budget went: the schedule, and the FLOPs and predicted error per letter."""
        n, cal = len(self.letters), self.calibration
        what = "FLOPs" if self.budget == "flops" else "time"
        ident = "built in" if cal.digest == BUILTIN else f"sha256 {cal.digest[:12]}"
        lines = [
            f"auto: solved for {self.speedup:g}x {what} from {cal.source} ({ident}): {self.letters}",
            f"  FLOPs {self.cost:.2f} of {n} full steps ({n / self.cost:.2f}x); predicted error "
            f"{self.predicted:.4g} ({cal.units}; uncached = 0)",
        ]
        if cal.times is not None:
            lines.append(f"  time on the calibrating machine: {n / cal.cost(self.letters, 'time'):.2f}x")
        for c in LETTERS:
            count = self.letters.count(c)
            if count:
                share = 100 * count * cal.costs[c] / self.cost
                lines.append(f"  {c}: {count:>2} steps, {share:5.1f}% of the FLOPs")
        lines.append("  steps    letters      FLOPs  predicted error")
        for start, end in self.segments():
            part = self.letters[start:end]
            err = cal.predict_segment(part, start)
            shown = "-" if err is None else f"{err:.4g}"
            lines.append(f"  {start:>2}-{end - 1:<2}    {part:<12} {cal.cost(part):5.2f}  {shown}")
        return lines

    def segments(self) -> list[tuple[int, int]]:
        """(first, end) of each run that starts with a full step."""
        starts = [i for i, c in enumerate(self.letters) if c == "F"]
        return list(zip(starts, [*starts[1:], len(self.letters)]))


def _segments(cal: Calibration, n: int, budget: str) -> list[tuple[int, str, int, int, float]]:
    """Every segment (start, pattern, inner steps, cost in grid units, predicted error) the model knows."""
    out, prices = [], cal.prices(budget)
    full = math.ceil(prices["F"] * _GRID)
    for i in range(n):
        out.append((i, "", 0, full, 0.0))
        for p in cal.errors:
            for m in range(1, cal.max_span):
                if i + 1 + m > n:
                    break
                err = cal.segment_error(p, i, m)
                inner = (p * m)[:m]
                cost = sum(prices[c] for c in inner)
                if err is None or not math.isfinite(err) or not math.isfinite(cost):
                    continue
                out.append((i, p, m, full + math.ceil(cost * _GRID), err))
    return out


def solve(cal: Calibration, speedup: float, num_steps: int, budget: str = "flops") -> Solved:
    """The schedule of least predicted error within num_steps / speedup full steps' FLOPs (or time)."""
    if num_steps != cal.num_steps:
        raise ValueError(
            f"cache method 'auto': calibration {cal.source!r} is for {cal.num_steps} steps, the run has "
            f"{num_steps}; calibrate at this step count"
        )
    n, limit = num_steps, int(num_steps / speedup * _GRID + 1e-6)
    best = np.full((n + 1, limit + 1), np.inf)
    best[0, 0] = 0.0
    choice = np.full((n + 1, limit + 1), -1, dtype=np.int64)
    segments = _segments(cal, n, budget)
    for index, (i, _p, m, cost, err) in enumerate(segments):
        j = i + 1 + m
        if cost > limit:
            continue
        candidate = best[i, : limit + 1 - cost] + err
        better = candidate < best[j, cost:]
        if better.any():
            best[j, cost:][better] = candidate[better]
            choice[j, cost:][better] = index
    if not np.isfinite(best[n]).any():
        floor = _cheapest(segments, n) / _GRID
        raise ValueError(
            f"cache method 'auto': speedup={speedup:g} is out of reach for this calibration ({cal.source}); "
            f"the most it allows over {n} steps is {n / floor:.2f}x"
        )
    used = int(np.argmin(best[n]))  # least error; among equal errors the cheapest (argmin takes the first)
    letters, j, b = [], n, used
    while j > 0:
        i, p, m, cost, _ = segments[int(choice[j, b])]
        letters.append("F" + (p * m)[:m])
        j, b = i, b - cost
    text = "".join(reversed(letters))
    return Solved(text, float(best[n, used]), cal.cost(text), speedup, cal, budget)


def _cheapest(segments: list[tuple[int, str, int, int, float]], n: int) -> float:
    cheapest = [0.0] + [math.inf] * n
    for i, _p, m, cost, _err in sorted(segments, key=lambda s: s[0]):
        j = i + 1 + m
        cheapest[j] = min(cheapest[j], cheapest[i] + cost)
    return cheapest[n]


__all__ = ["BUILTIN", "FORMAT", "LETTERS", "Calibration", "Solved", "load_calibration", "magcache_calibration", "solve"]
