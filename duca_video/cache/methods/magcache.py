"""MagCache: skip the block stack on steps where calibrated magnitude ratios say its residual barely changes.

A calibration run (`python -m duca_video.cache.methods.magcache_calibrate`) records, per step, the ratio
g_i = mean over tokens of |r_i| / |r_(i-1)|, where r = stack output - stack input and |.| is the L2 norm over
channels. At run time, after the first `retention_ratio` of the steps (always computed):
    s <- s * g_i ;  E <- E + |1 - s| ;  k <- k + 1
    skip (input + the residual of the last computed step) while E < threshold and k <= max_skips,
    else compute and reset s = 1, E = 0, k = 0.
The decisions depend only on the ratios, so the whole plan is known when the sample starts: nothing is read
from the data, every rank of a sequence-parallel group takes the same decisions, and FLOP replays follow it.

`threshold` is compared strictly (E < threshold), as in MagCache's Wan2.1 code: threshold 0 never skips, even
where a ratio is exactly 1. Default ratios: those the MagCache authors calibrated for Open-Sora 1.2 (their
experiment file: 480p, 51 frames, 30 steps; the published list with the square root they apply), and their
settings 0.12 / 3 / 0.2. Another model needs its own file (`ratios_path`); ratios calibrated for a different step
count are resampled (see `resample_ratios`) and a warning says so.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..config import MODULES, CacheConfig, check_field
from ..policy import ResidualStackPolicy, Sample
from ..records import StepKind
from ..schedule import Action, StepPlan, full_schedule, same_actions

log = logging.getLogger(__name__)

# MagCache's Open-Sora 1.2 experiment: steps 1..29 of 30, used as their square root (step 0 has no predecessor).
_PUBLISHED_OPEN_SORA_12 = (
    0.93359,
    0.96484,
    0.99609,
    1.0,
    0.99609,
    0.99609,
    0.99219,
    1.0,
    1.0,
    0.99609,
    0.99219,
    1.0,
    0.99219,
    0.99609,
    0.99219,
    0.99609,
    0.99609,
    0.99609,
    0.99219,
    0.99219,
    0.99219,
    0.98828,
    0.98828,
    0.98438,
    0.98438,
    0.97656,
    0.97656,
    0.96484,
    0.96484,
)
OPEN_SORA_12_RATIOS = (1.0, *(math.sqrt(r) for r in _PUBLISHED_OPEN_SORA_12))


def read_ratios_file(path: str | Path) -> dict[str, Any]:
    """A calibration file's content, checked: {"num_steps": N, "ratios": [N numbers > 0], ...}."""
    where = f"cache method 'magcache': ratios_path={str(path)!r}"
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{where}: no such file; make one with `python -m duca_video.cache.methods."
            "magcache_calibrate --config CONFIG --prompts N --out FILE.json`"
        ) from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: not a readable JSON file ({exc})") from None
    ratios = data.get("ratios") if isinstance(data, dict) else None
    if not isinstance(ratios, list) or not _valid_ratios(ratios):
        raise ValueError(f"{where}: needs a 'ratios' list of >= 2 finite numbers > 0 (one per step)")
    if data.get("num_steps") != len(ratios):
        raise ValueError(f"{where}: num_steps={data.get('num_steps')!r} but {len(ratios)} ratios")
    return data


def _valid_ratios(ratios: Any) -> bool:
    numbers = all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ratios)
    return len(ratios) >= 2 and numbers and all(math.isfinite(r) and r > 0 for r in ratios)


def resample_ratios(ratios: tuple[float, ...], num_steps: int) -> tuple[float, ...]:
    """Ratios calibrated on len(ratios) steps, for `num_steps` steps over the same sampling path.

    The product of the ratios up to step i is the residual magnitude at i relative to step 0; its log is
    interpolated linearly at the new steps' relative positions (i / (steps - 1)) and differenced again. So a run
    with half the steps sees per-step ratios that compound two calibrated ones, not a subsample of them."""
    n = len(ratios)
    if num_steps == n:
        return tuple(ratios)
    if num_steps == 1:
        return (1.0,)
    logs = [0.0]
    for r in ratios[1:]:
        logs.append(logs[-1] + math.log(r))

    def at(u: float) -> float:  # the log magnitude at relative position u in [0, 1]
        x = u * (n - 1)
        i = min(int(x), n - 2)
        return logs[i] + (x - i) * (logs[i + 1] - logs[i])

    points = [at(j / (num_steps - 1)) for j in range(num_steps)]
    return (1.0, *(math.exp(b - a) for a, b in zip(points, points[1:])))


def skip_decisions(ratios: tuple[float, ...], threshold: float, max_skips: int, retention_ratio: float) -> list[bool]:
    """Per step, whether MagCache skips the stack (step 0 and the retained first steps never do)."""
    first = max(1, int(retention_ratio * len(ratios) + 1e-9))  # 0.2 * 30 must give 6, not 5.999...
    skips, scale, error, run = [], 1.0, 0.0, 0
    for i, ratio in enumerate(ratios):
        skip = False
        if i >= first:
            scale *= ratio
            error += abs(1.0 - scale)
            run += 1
            skip = error < threshold and run <= max_skips
            if not skip:  # this step computes: its residual is the new reference
                scale, error, run = 1.0, 0.0, 0
        skips.append(skip)
    return skips


@dataclass
class MagCacheConfig(CacheConfig):
    """MagCache: skip the block stack (input + last computed residual) while the error accumulated from the
    calibrated magnitude ratios stays under `threshold`, at most `max_skips` steps in a row; the first
    `retention_ratio` of the steps always compute. Ratios: `ratios_path` (a calibration JSON) or `ratios`
    (one per step), else Open-Sora 1.2's published ones (480p, 30 steps)."""

    method: ClassVar[str] = "magcache"
    threshold: float = 0.12
    max_skips: int = 3
    retention_ratio: float = 0.2
    ratios_path: str = ""
    ratios: tuple[float, ...] = ()

    def validate(self) -> None:
        check_field(self.threshold >= 0, self.method, "threshold", "a number >= 0", self.threshold)
        check_field(self.max_skips >= 0, self.method, "max_skips", "an int >= 0", self.max_skips)
        check_field(
            0 <= self.retention_ratio <= 1, self.method, "retention_ratio", "a number in [0, 1]", self.retention_ratio
        )
        check_field(
            not (self.ratios and self.ratios_path),
            self.method,
            "ratios",
            "empty when ratios_path is given (one source of ratios)",
            self.ratios,
        )
        if self.ratios:
            check_field(
                _valid_ratios(self.ratios),
                self.method,
                "ratios",
                "a list of >= 2 finite numbers > 0, one per step",
                self.ratios,
            )
        # Read now, so that a bad file is an error before any model loads.
        self._file = read_ratios_file(self.ratios_path) if self.ratios_path else None

    def calibrated_ratios(self) -> tuple[float, ...]:
        if self.ratios:
            return tuple(self.ratios)
        if self.ratios_path:
            if getattr(self, "_file", None) is None:
                self.validate()
            return tuple(float(r) for r in self._file["ratios"])
        return OPEN_SORA_12_RATIOS

    def step_ratios(self, num_steps: int) -> tuple[float, ...]:
        """The ratios for a run of `num_steps` steps (resampled when calibrated for another count)."""
        ratios = self.calibrated_ratios()
        if len(ratios) != num_steps and getattr(self, "_warned", None) != num_steps:
            self._warned = num_steps  # once per config and step count, not once per batch
            log.warning(
                "magcache: ratios calibrated for %d steps, resampled for %d (%s)",
                len(ratios),
                num_steps,
                self.ratios_path or ("inline ratios" if self.ratios else "Open-Sora 1.2 defaults"),
            )
        return resample_ratios(ratios, num_steps)

    def make_policy(self, sample: Sample) -> MagCachePolicy:
        return MagCachePolicy(self, sample)


class MagCachePolicy(ResidualStackPolicy):
    """A static plan from the ratios; skipped steps add the residual of the last computed step."""

    def plan(self) -> list[StepPlan]:
        n = len(self.sample.timesteps)
        c = self.config
        skips = skip_decisions(c.step_ratios(n), c.threshold, c.max_skips, c.retention_ratio)
        plans = full_schedule(n)
        for s, skip in enumerate(skips):
            if skip:
                plans[s] = StepPlan(StepKind.STACK_SKIP, same_actions(dict.fromkeys(MODULES, Action.REUSE)))
        return plans

    def residual_needed(self) -> bool:
        # A computed step replaces the residual, so only the skips right after this step read it.
        nxt = self.sample.step + 1
        return nxt < len(self.sample.plans) and self.sample.plans[nxt].skips_stack


METHODS = (MagCacheConfig,)
