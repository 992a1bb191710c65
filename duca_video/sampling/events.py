"""Sampling events: how the sampler tells interested parties (the cache) where it is.

The sampler never knows what listens. A listener is registered on the *model* (so that
`duca_video.cache.enable(model, ...)` is enough for any sampler that announces events),
and the sampler announces to every listener found on the model it is driving.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

_ATTR = "_duca_sampling_listeners"
_VIEW = "_duca_sample_view"


@dataclass(frozen=True)
class SampleStart:
    """Announced once per sample (a batch of prompts denoised together)."""

    num_steps: int
    timesteps: tuple[float, ...]  # the (transformed) timesteps, in [0, num_timesteps], step 0 first
    batch_size: int  # prompts in the batch (the model sees 2x this with CFG)
    cfg: bool  # True when the model batch is [cond, null]
    seed: int | None  # the run's seed, for reproducible token selection
    # One seed per video (batch_size of them) when the caller has them: each video's token selection is then
    # drawn from its own seed, independent of the batch; None = every video uses `seed`.
    seeds: tuple[int, ...] | None = None
    # CFG parallelism: the process group whose other rank runs the other CFG half of this batch (a cache that
    # decides from the whole batch, e.g. TeaCache, reduces its signal over it); None otherwise.
    row_group: Any = None


@dataclass(frozen=True)
class StepStart:
    """Announced before the model is called for step `index` (0 = noisiest)."""

    index: int
    num_steps: int
    t: float  # this step's timestep (first sample's value when it differs per sample)


@runtime_checkable
class SamplingListener(Protocol):
    def on_sample_start(self, event: SampleStart) -> None: ...

    def on_step_start(self, event: StepStart) -> None: ...

    def on_sample_end(self) -> None: ...


def register_listener(model: torch.nn.Module, listener: SamplingListener) -> None:
    listeners = model.__dict__.setdefault(_ATTR, [])
    if listener not in listeners:
        listeners.append(listener)


def unregister_listener(model: torch.nn.Module, listener: SamplingListener) -> None:
    listeners = model.__dict__.get(_ATTR, [])
    if listener in listeners:
        listeners.remove(listener)


def set_sample_view(model: torch.nn.Module, view: Callable[[SampleStart], SampleStart] | None) -> None:
    """What the listeners are told of a sample, when a wrapper changes the batch the model really runs (CFG
    parallelism: one half of it); None: the sampler's own announcement."""
    if view is None:
        model.__dict__.pop(_VIEW, None)
    else:
        model.__dict__[_VIEW] = view


def listeners_of(model: torch.nn.Module) -> list[SamplingListener]:
    # torch.compile wraps the model (OptimizedModule); the listeners sit on the module it compiled.
    model = getattr(model, "_orig_mod", model)
    listeners = list(model.__dict__.get(_ATTR, []))
    view = model.__dict__.get(_VIEW)
    return listeners if view is None else [_Viewed(listener, view) for listener in listeners]


@dataclass(frozen=True)
class _Viewed:
    """A listener told the model's view of each sample (see `set_sample_view`)."""

    listener: SamplingListener
    view: Callable[[SampleStart], SampleStart]

    def on_sample_start(self, event: SampleStart) -> None:
        self.listener.on_sample_start(self.view(event))

    def on_step_start(self, event: StepStart) -> None:
        self.listener.on_step_start(event)

    def on_sample_end(self) -> None:
        self.listener.on_sample_end()
