"""Following sampling from the model's own forward calls, for samplers that announce nothing.

Our `RFlowSampler` announces every sample and step (`duca_video.sampling.events`). Upstream Open-Sora's
`RFLOW.sample` (what its `scripts/inference.py` runs) only calls `model(z_in, t, **model_args)` once per step.
Given the sampler's settings (`enable(model, method, scheduler=rflow)` or `num_sampling_steps=N`), the cache
works out where sampling is from those calls alone:
  - the timesteps: computed from the settings (and the height / width / num_frames the model receives) with
    upstream's arithmetic, in the dtype of those inputs, so they are the very numbers the sampler passes;
  - a step: the next call, whose timestep must be the next one expected (anything else is an error that says
    what to pass: a silently uncached or mis-scheduled run is never an option);
  - a new sample: a call at the first timestep when no sample is open (or when one was left unfinished);
  - the end of a sample: the return of the call for the last step (so `summary()` describes that sample);
  - classifier-free guidance: upstream's batch layout, `[z, z]` with captions `[y, null]`, where null is the
    model's own `y_embedder.y_embedding`;
  - token-selection seeds: `enable(..., seed=...)`, one int for every video or one per video (default 0).
An explicit announcement by a sampler always wins: while one is open, forward calls are not interpreted.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..sampling.events import SampleStart, StepStart

_BASE_RESOLUTION = 512 * 512


@dataclass(frozen=True)
class SamplingSettings:
    """What the timesteps of a sample depend on. Missing settings take upstream RFLOW's defaults."""

    num_sampling_steps: int = 10
    num_timesteps: int = 1000
    use_timestep_transform: bool = False
    use_discrete_timesteps: bool = False
    transform_scale: float = 1.0  # upstream's RFLOW.sample ignores it (1.0); our RFlowSampler honours it

    def __post_init__(self) -> None:
        for name in ("num_sampling_steps", "num_timesteps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"cache: scheduler {name}={value!r} is invalid; allowed: an int >= 1")


def settings_from(scheduler: Any = None, num_sampling_steps: int | None = None) -> SamplingSettings | None:
    """Settings from a sampler object (upstream's RFLOW, our RFlowSampler) or a dict like Open-Sora's
    `scheduler = dict(type="rflow", ...)`; `num_sampling_steps=N` alone means Open-Sora 1.2's inference
    sampler (timestep transform on) with N steps. None when neither is given."""
    if scheduler is None and num_sampling_steps is None:
        return None
    if scheduler is None:
        return SamplingSettings(num_sampling_steps=num_sampling_steps, use_timestep_transform=True)
    fields = (
        "num_sampling_steps",
        "num_timesteps",
        "use_timestep_transform",
        "use_discrete_timesteps",
        "transform_scale",
    )
    if isinstance(scheduler, Mapping):
        values = {k: scheduler[k] for k in fields if k in scheduler}
    else:
        values = {k: getattr(scheduler, k) for k in fields if hasattr(scheduler, k)}
    if "num_sampling_steps" not in values and not isinstance(scheduler, Mapping):
        raise ValueError(
            f"cache: scheduler={type(scheduler).__name__} has no num_sampling_steps; pass the sampler"
            " that drives the model (e.g. upstream's RFLOW) or num_sampling_steps=N"
        )
    if num_sampling_steps is not None:
        values["num_sampling_steps"] = num_sampling_steps
    return SamplingSettings(**values)


def expected_timesteps(settings: SamplingSettings, height: Any, width: Any, num_frames: Any) -> list[float]:
    """The timesteps the sampler will pass, noisiest first.

    With the transform, the arithmetic is upstream's, in the dtype and on the device of the model's inputs
    (bf16 inputs give bf16 ratios, as upstream): the results are the numbers its sampler computes."""
    n, total = settings.num_sampling_steps, settings.num_timesteps
    ts: list[float] = [(1.0 - i / n) * total for i in range(n)]
    if settings.use_discrete_timesteps:
        ts = [int(round(t)) for t in ts]
    if not settings.use_timestep_transform:
        return [float(t) for t in ts]
    missing = [k for k, v in (("height", height), ("width", width), ("num_frames", num_frames)) if v is None]
    if missing:
        raise RuntimeError(
            f"cache: the timestep transform needs the model's {', '.join(missing)} argument(s), "
            "which this call does not pass; pass them to the model as Open-Sora does"
        )
    h, w, f = (torch.as_tensor(v).flatten()[:1] for v in (height, width, num_frames))
    t = torch.tensor(ts, device=h.device) / total
    ratio_space = (h * w / _BASE_RESOLUTION).sqrt()
    frames = torch.ones_like(f) if bool(f[0] == 1) else f // 17 * 5  # latent frames of the 17-frame VAE
    ratio = ratio_space * frames.sqrt() * settings.transform_scale
    return [float(v) for v in (ratio * t / (1 + (ratio - 1) * t) * total).tolist()]


@dataclass
class ModelCall:
    x: torch.Tensor
    timestep: torch.Tensor
    y: torch.Tensor | None
    extra: dict[str, Any]  # height, width, num_frames, ...

    @classmethod
    def parse(cls, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> ModelCall:
        """The STDiT3 call `model(x, timestep, y, mask=..., x_mask=..., fps=..., height=..., width=..., ...)`."""
        signature = inspect.signature(model.forward)
        try:
            bound = signature.bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise RuntimeError(f"cache: cannot read this call of {type(model).__name__}.forward: {exc}") from None
        values: dict[str, Any] = {}
        for name, value in bound.items():  # **kwargs (upstream's num_frames, ar, ...) count as arguments too
            var_keyword = signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
            values.update(value if var_keyword else {name: value})
        x, timestep = values.get("x"), values.get("timestep")
        if not isinstance(x, torch.Tensor) or not isinstance(timestep, torch.Tensor):
            raise RuntimeError(f"cache: {type(model).__name__} was called without tensors x and timestep")
        return cls(x, timestep, values.get("y"), values)

    def uniform_t(self) -> float:
        t = self.timestep.detach().flatten().float()
        if t.numel() and bool(t.isnan().any()):
            raise RuntimeError(
                "cache: the sampler passed NaN timesteps; Open-Sora 1.2's timestep transform gives NaN "
                "below 17 frames (num_frames // 17 * 5 = 0): generate at least 17 frames"
            )
        if t.numel() == 0 or not bool((t == t[0]).all()):
            raise RuntimeError(f"cache: one timestep per model call is expected, got {t.tolist()}")
        return float(t[0].item())


def _close(a: float, b: float, total: int) -> bool:
    return abs(a - b) <= 1e-4 * total


class SampleFollower:
    """Drives a controller's sample and step boundaries from forward hooks on the model."""

    def __init__(self, controller: Any, settings: SamplingSettings | None, seed: int | Sequence[int] | None) -> None:
        self.controller = controller
        self.settings = settings
        self.seed = seed
        self.open = False  # a sample found by following is in progress
        self.step = -1

    def _help(self) -> str:
        return (
            f"pass the sampler's settings to duca_video.cache.enable(model, {self.controller.config.method!r}, "
            "scheduler=<the sampler that drives the model, e.g. upstream's RFLOW>) or num_sampling_steps=N"
        )

    def before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ctl = self.controller
        if ctl.announced or (self.settings is None and not ctl.caches):
            return
        if self.settings is None:
            raise RuntimeError(
                f"cache {ctl.config.method!r}: {type(model).__name__} was called outside a sample "
                f"that a sampler announced, and the cache was not told how sampling goes: "
                f"{self._help()}"
            )
        call = ModelCall.parse(model, args, kwargs)
        t, total, nxt = call.uniform_t(), self.settings.num_timesteps, self.step + 1
        waiting = ctl.timesteps[nxt] if self.open and nxt < len(ctl.timesteps) else None
        if waiting is not None and _close(t, waiting, total):
            rows = ctl.sample.rows  # the sample is open: it is the one in progress
            if call.x.shape[0] != rows:
                raise RuntimeError(f"cache: the batch changed from {rows} to {call.x.shape[0]} rows mid-sample")
        else:
            start = self._prepare(model, call)
            self._close_sample()  # an unfinished sample (e.g. interrupted) ends here
            if not _close(t, start.timesteps[0], total):
                where = (
                    f"step {nxt} expects t={waiting:.4f}"
                    if waiting is not None
                    else (f"a sample starts at t={start.timesteps[0]:.4f}")
                )
                raise RuntimeError(
                    f"cache: {type(model).__name__} was called at t={t:.4f}, but {where} with the "
                    f"sampling settings given ({self.settings}); {self._help()}, matching the "
                    "sampler that drives the model"
                )
            ctl.begin_sample(start)
            self.open, nxt = True, 0
        self.step = nxt
        ctl.on_step_start(StepStart(nxt, len(ctl.timesteps), t))

    def after(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self.open and not self.controller.announced and self.step == len(self.controller.timesteps) - 1:
            self._close_sample()

    def reset(self) -> None:
        """A sampler announced a sample: whatever was being followed is over."""
        self.open, self.step = False, -1

    def _close_sample(self) -> None:
        if self.open:
            self.controller.finish_sample()
        self.reset()

    def _prepare(self, model: nn.Module, call: ModelCall) -> SampleStart:
        """The sample that a call at the first timestep starts, from this call's inputs."""
        e = call.extra
        timesteps = expected_timesteps(self.settings, e.get("height"), e.get("width"), e.get("num_frames"))
        rows = call.x.shape[0]
        cfg = is_cfg_batch(model, call.x, call.y)
        videos = rows // 2 if cfg else rows
        if self.seed is None or isinstance(self.seed, int):
            seeds = (int(self.seed or 0),) * videos
        else:
            seeds = tuple(int(s) for s in self.seed)
            if len(seeds) != videos:
                layout = f" (the CFG halves of {rows} rows)" if cfg else ""
                raise ValueError(
                    f"cache: seed= gives {len(seeds)} seeds for a batch of {videos} video(s){layout}; "
                    "pass one per video or a single int"
                )
        return SampleStart(len(timesteps), tuple(timesteps), videos, cfg, seeds[0], seeds)


def is_cfg_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> bool:
    """Upstream's classifier-free guidance batch: `[z, z]` and captions `[y, null]`, null being the model's
    `y_embedder.y_embedding` (when the model has one)."""
    rows = x.shape[0]
    if rows % 2 or not torch.equal(x[: rows // 2], x[rows // 2 :]):
        return False
    null = getattr(getattr(model, "y_embedder", None), "y_embedding", None)
    if null is None or y is None:
        return True
    second = y[rows // 2 :]
    return second.shape[-2:] == null.shape and torch.equal(second, null.to(second.dtype).expand_as(second))
