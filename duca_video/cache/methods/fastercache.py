"""FasterCache (Lv et al., 2024) with the settings its authors ran on Open-Sora 1.2 (30 steps, CFG 7).

Two independent parts, each with its switch:

(a) Dynamic attention reuse (`attention`): from step `attn_start` on, every `attn_interval`-th step does not
    run the self-attention (spatial and temporal blocks; cross-attention too if listed in `modules`); its output,
    before the gate, is extrapolated from the last two steps that computed it,
        F_s = F_last + w_s * (F_last - F_prev),   w_s = attn_weight * (s - attn_start + 1) / attn_weight_steps,
    a weight that grows with the distance from the start of the reuse phase (the authors' Open-Sora script:
    0.9 * (s - 6) / 20). Cross-attention and MLP run every step, as in that script.
(b) CFG-Cache (`cfg_cache`): from step `cfg_start` on, only the steps with (s + 1) % cfg_interval == 0 run both
    CFG halves (14, 19, 24, 29 at the defaults); the others run the conditional rows only and rebuild the
    unconditional output from the last full step's difference D = uncond - cond, split by a 2-D FFT over (H, W)
    into a low band (|k| <= min(H, W) // radius_divisor) and the rest:
        uncond_s = cond_s + w_low * D_low + w_high * D_high.
    Each cached step multiplies w_low by `low_boost` while s <= low_boost_until and w_high by `high_boost` while
    s >= high_boost_from (both reset to 1 when D is refreshed): early steps lean on the low band, late ones on
    the high band. Adding the bands in space equals the authors' "FFT(cond) + weighted bands, inverse FFT" (the
    FFT is linear) and keeps the rebuild per position, so it also holds on sequence-parallel shards.

The schedule is static (no data-dependence). A step that runs both halves never extrapolates from cond-only
computes (they lack the unconditional rows): it computes its attention instead. Under sequence parallelism in
sharded-output mode, D is summed over the group (one all-reduce of a latent-sized tensor, only on the full
steps whose D a later step reads), so every rank splits the same whole-grid D; everything else is rank-local.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...parallel.comm import all_reduce_sum
from ..config import MODULES, CacheConfig, check_field
from ..policy import CachePolicy, Sample
from ..records import StepKind
from ..schedule import Action, StepPlan, same_actions
from ..state import STACK

EXTRAPOLATED = ("attn", "cross")  # the modules (a) may extrapolate


@dataclass
class FasterCacheConfig(CacheConfig):
    """FasterCache: self-attention of every `attn_interval`-th step from `attn_start` extrapolated from the last
    two computed steps; CFG-Cache: from `cfg_start` the unconditional half is rebuilt from the cached,
    frequency-split difference except on every `cfg_interval`-th step."""

    method: ClassVar[str] = "fastercache"
    wraps_model_forward: ClassVar[bool] = True
    reads_on_update: ClassVar[bool] = True  # a full step's update reads the older values
    attention: bool = True
    modules: tuple[str, ...] = ("attn",)
    attn_start: int = 7
    attn_interval: int = 2
    attn_weight: float = 0.9
    attn_weight_steps: int = 20
    cfg_cache: bool = True
    cfg_start: int = 11
    cfg_interval: int = 5
    low_boost: float = 1.15
    low_boost_until: int = 24
    high_boost: float = 1.15
    high_boost_from: int = 19
    radius_divisor: int = 5

    def validate(self) -> None:
        ints = (
            ("attn_start", 2),
            ("attn_interval", 2),
            ("attn_weight_steps", 1),
            ("cfg_start", 1),
            ("cfg_interval", 1),
            ("low_boost_until", 0),
            ("high_boost_from", 0),
            ("radius_divisor", 1),
        )
        for name, low in ints:
            value = getattr(self, name)
            check_field(isinstance(value, int) and value >= low, self.method, name, f"int >= {low}", value)
        for name in ("low_boost", "high_boost"):
            check_field(getattr(self, name) > 0, self.method, name, "a number > 0", getattr(self, name))
        check_field(self.attn_weight >= 0, self.method, "attn_weight", "a number >= 0", self.attn_weight)
        check_field(
            len(self.modules) > 0 and set(self.modules) <= set(EXTRAPOLATED),
            self.method,
            "modules",
            f"a non-empty subset of {EXTRAPOLATED}",
            self.modules,
        )

    def layout_identity(self, cfg_parallel: bool) -> dict[str, Any]:
        # With the two CFG halves on two ranks no rank holds both halves, so CFG-Cache cannot run: every step
        # computes the unconditional rows, a different video from one process's.
        return {"cfg_cache_off": "cfg_parallel"} if cfg_parallel and self.cfg_cache else {}

    def make_policy(self, sample: Sample) -> FasterCachePolicy:
        return FasterCachePolicy(self, sample)


def low_band_mask(h: int, w: int, divisor: int, device: torch.device) -> torch.Tensor:
    """(H, W) True on the FFT bins within radius min(H, W) // divisor of frequency 0 (unshifted layout)."""
    ky = torch.fft.fftfreq(h, 1.0 / h, device=device)
    kx = torch.fft.fftfreq(w, 1.0 / w, device=device)
    radius = min(h, w) // divisor
    return ky[:, None] ** 2 + kx[None, :] ** 2 <= radius**2


def split_bands(delta: torch.Tensor, divisor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`delta` (..., H, W) as low + high spatial-frequency parts (real, same shape; low + high == delta)."""
    spectrum = torch.fft.fft2(delta.float())
    mask = low_band_mask(delta.shape[-2], delta.shape[-1], divisor, delta.device)
    low = torch.fft.ifft2(spectrum * mask).real.to(delta.dtype)
    return low, delta - low


def _slot(module: str, prev: bool) -> str:
    return f"{module}_prev" if prev else module


class FasterCachePolicy(CachePolicy):
    def __init__(self, config: FasterCacheConfig, sample: Sample) -> None:
        super().__init__(config, sample)
        n = len(sample.timesteps)
        self.cond_only = [self._cond_only(s) for s in range(n)]  # (b): steps that run the conditional rows only
        self.reused = [False] * n  # (a): steps whose attention is extrapolated
        self.needed: set[int] = set()  # computed steps whose attention a later step extrapolates from
        self.weights = [1.0, 1.0]  # (b): the current low / high band weights

    # -- the schedule ----------------------------------------------------------------------------------
    def _cond_only(self, s: int) -> bool:
        c = self.config
        return c.cfg_cache and self.sample.cfg and s >= c.cfg_start and (s + 1) % c.cfg_interval != 0

    def attn_weight(self, s: int) -> float:
        c = self.config
        return c.attn_weight * (s - c.attn_start + 1) / c.attn_weight_steps

    def plan(self) -> list[StepPlan]:
        c, n = self.config, len(self.sample.timesteps)
        computed: list[int] = []
        for s in range(n):
            wanted = c.attention and s >= c.attn_start and (s - c.attn_start) % c.attn_interval == 0
            # Both sources must hold this step's rows: a cond-only compute lacks the unconditional half.
            rows_ok = all(self.cond_only[s] or not self.cond_only[r] for r in computed[-2:])
            if wanted and len(computed) >= 2 and rows_ok:
                self.reused[s] = True
                self.needed.update(computed[-2:])
            else:
                computed.append(s)
        plans = []
        for s in range(n):
            act = {m: Action.REUSE if self.reused[s] and m in c.modules else Action.COMPUTE for m in MODULES}
            plan = StepPlan(StepKind.MODULE_REUSE if self.reused[s] else StepKind.FULL, same_actions(act))
            if s in self.needed:  # mark_storage only adds to `keep`: the controller then hands us these outputs
                for kind in plan.keep:
                    plan.keep[kind].update(c.modules)
            plans.append(plan)
        return plans

    # -- (a) attention extrapolation --------------------------------------------------------------------
    def _rows(self) -> int:
        return self.sample.rows // 2 if self.cond_only[self.sample.step] else self.sample.rows

    def update(self, index: int, module: str, value: torch.Tensor, keep: bool) -> None:
        if not self.config.attention or module not in self.config.modules:
            return super().update(index, module, value, keep)
        s = self.sample.step
        if self.reused[s]:  # the value is our own extrapolation: the sources stay as they are
            return
        if s not in self.needed:  # no later step reads this or anything older
            self.store.drop(index, _slot(module, False))
            self.store.drop(index, _slot(module, True))
            return
        last = self.store.get(index, module)
        if last is not None:  # a cond-only step keeps only the conditional rows of the older source
            prev = last if last.shape[0] <= value.shape[0] else last[: value.shape[0]].clone()
            self.store.put(index, _slot(module, True), prev)
        self.store.put(index, module, value)

    def approximate(self, index: int, module: str) -> torch.Tensor:
        last, prev = self.store.get(index, module), self.store.get(index, _slot(module, True))
        if last is None or prev is None:
            raise RuntimeError(
                f"cache 'fastercache': step {self.sample.step} extrapolates {module} of block "
                f"{index}, but fewer than two earlier steps stored it"
            )
        rows = self._rows()
        last, prev = last[:rows], prev[:rows]
        return last + self.attn_weight(self.sample.step) * (last - prev)

    # -- (b) CFG-Cache ----------------------------------------------------------------------------------
    def model_forward(self, call: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        s, rows = self.sample.step, self.sample.rows
        if s < 0 or not (self.config.cfg_cache and self.sample.cfg):
            return call(*args, **kwargs)
        if self.cond_only[s]:
            half = rows // 2

            def cut(v: Any) -> Any:  # the conditional rows of every per-row argument (the first half, as CFG)
                return v[:half] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v

            cond = call(*[cut(a) for a in args], **{k: cut(v) for k, v in kwargs.items()})
            if self.sample.history:
                self.sample.history[-1]["model_rows"] = half
            return torch.cat([cond, self._rebuild_uncond(cond)], 0)
        out = call(*args, **kwargs)
        if self.sample.history:
            self.sample.history[-1]["model_rows"] = rows
        if s + 1 < len(self.cond_only) and self.cond_only[s + 1]:
            self._store_difference(out)
        else:
            self.store.drop(STACK, "uncond_low")
            self.store.drop(STACK, "uncond_high")
        return out

    def _store_difference(self, out: torch.Tensor) -> None:
        cond, uncond = out.chunk(2, dim=0)
        delta = uncond - cond
        layout = self.sample.layout
        if layout is not None and not getattr(layout, "gather_output", True):
            # Sharded outputs are zero outside each rank's positions: the sum is the whole-grid difference.
            delta = all_reduce_sum(delta, layout.group, layout.stats, "fastercache_cfg_delta")
        low, high = split_bands(delta, self.config.radius_divisor)
        self.store.put(STACK, "uncond_low", low)
        self.store.put(STACK, "uncond_high", high)
        self.weights = [1.0, 1.0]

    def _rebuild_uncond(self, cond: torch.Tensor) -> torch.Tensor:
        c, s = self.config, self.sample.step
        low, high = self.store.get(STACK, "uncond_low"), self.store.get(STACK, "uncond_high")
        if low is None or high is None:
            raise RuntimeError(
                f"cache 'fastercache': step {s} rebuilds the unconditional half, but no earlier step "
                "stored the CFG difference"
            )
        if s <= c.low_boost_until:
            self.weights[0] *= c.low_boost
        if s >= c.high_boost_from:
            self.weights[1] *= c.high_boost
        return cond + self.weights[0] * low + self.weights[1] * high


METHODS = (FasterCacheConfig,)
