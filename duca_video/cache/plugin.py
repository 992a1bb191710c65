"""The cache plugin: `enable(model, method)` wraps every STDiT3 block of a model and follows the schedule.

What a method does is its policy's business (`policy.py`, one module per method in `methods/`); this module
installs the cache, follows sampling and runs each block: compute a module, or ask the policy for it. It needs
nothing but Open-Sora's block attribute names (`attn`, `cross_attn`, `mlp`, `norm1`, `norm2`,
`scale_shift_table`, `temporal`) and the block call signature `(x, y, t, mask, x_mask, t0, T, S)`, so it works
on our STDiT3 and on an upstream Open-Sora model instance alike. It learns where sampling is from the sampler's
events (see `duca_video.sampling.events`) or, for a sampler that announces nothing (upstream's `RFLOW.sample`),
from the model's own forward calls and the sampler's settings (`follow.py`). Under upstream's sequence
parallelism it reads upstream's group (`upstream.py`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..parallel.sequence import layout_of
from ..sampling.events import SampleStart, StepStart, register_listener, unregister_listener
from ..seeds import check_seed
from .compile import keep_out_of_tracing
from .config import CacheConfig, make_config
from .follow import SampleFollower, SamplingSettings, settings_from
from .methods.none import NoneConfig
from .methods.token.drawing import Selector
from .methods.token.folding import Folder
from .policy import Sample, StepState, TokenScratch
from .records import StepRecord
from .report import summary_text
from .runner import BlockCall, StepContext, run_block
from .schedule import Action, StepPlan, build_schedule, schedule_table
from .state import CacheState, OffloadedState
from .structure import caption_rows, find_blocks
from .upstream import UpstreamLayout, localize_cross_attention, restore_cross_attention, upstream_sp_group

_ATTR = "_duca_cache_controller"


class CacheController:
    """Listens to the sampler, makes one `Sample` (with the method's policy) per sample and hands every block
    to `runner.run_block` with the step's context."""

    def __init__(
        self,
        model: nn.Module,
        config: CacheConfig,
        fold: bool = True,
        settings: SamplingSettings | None = None,
        seed: int | tuple[int, ...] | None = None,
        offload: bool = False,
    ) -> None:
        self.model = model
        self.config = config
        self.offload = offload  # keep the cache in host memory, about two blocks' worth on the device
        self.follower = SampleFollower(self, settings, seed)
        self.announced = False  # a sampler announced the sample in progress
        self._layout: UpstreamLayout | None = None  # upstream's sequence parallelism, when the model uses it
        self._hooks: list[Any] = []
        self.blocks = find_blocks(model)
        # The token family's parts, for a method with a token selector: which tokens a partial recompute
        # refreshes, and folding (one tensor per block for the single conservative step that reads it).
        has_selector = getattr(config, "selector", None) is not None
        self.selector = Selector(config, self.blocks) if has_selector else None
        self.folder = Folder(config, model) if fold and Folder.possible(model, config) else None
        self.sample: Sample | None = None  # the sample in progress
        self.last: Sample | None = None  # the last finished one (its history; its tensors are freed)
        self.cache_bytes = 0  # peak bytes of the last finished (or current) sample
        self.device_cache_bytes = 0  # of those, the peak held on the device (less with offload)
        # FLOP replays on the meta device (metrics.flops.SamplingFlops): a data-dependent method's per-step
        # decisions of the real run, as the history's labels (records.StepRecord).
        self.replay_kinds: list[str] | None = None

    # -- installation ---------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> Any:
        # The copy's blocks and hooks would still call this controller (bound to the original model's blocks).
        raise TypeError(
            "copy.deepcopy of a model with the cache enabled: the cache belongs to the original model. "
            "Call duca_video.cache.disable(model) before copying it, then enable the cache on each copy"
        )

    def install(self) -> None:
        # The cache's Python (the schedule, the policy's decisions, the store) runs outside torch.compile's
        # graphs: traced, its per-step state would become guards and recompile the model at every step. The
        # blocks' modules compile on their own (`compile_blocks`), with one static shape per step kind.
        block_forward = keep_out_of_tracing(self._block_forward)
        for index, block in enumerate(self.blocks):
            block.forward = functools.partial(block_forward, index, block)
        register_listener(self.model, self)
        self.model.__dict__[_ATTR] = self
        eager = keep_out_of_tracing
        self._hooks.append(self.model.register_forward_pre_hook(eager(self.follower.before), with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(eager(self.follower.after), with_kwargs=True))
        self._find_layout()
        if self.folder is not None:  # the fps embedding of each forward, for the next step's modulation
            self._hooks.append(self.folder.install())
        if self.selector is not None:  # scored selectors capture projections a full step computes anyway
            self._hooks += self.selector.install(self.blocks)
        if self.config.wraps_model_forward:  # the policy sees the whole model call (e.g. a CFG cache)
            forward = self.model.forward
            self.model.forward = functools.wraps(forward)(functools.partial(self._model_forward, forward))

    def remove(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.model.__dict__.pop("forward", None)
        unregister_listener(self.model, self)
        self.model.__dict__.pop(_ATTR, None)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        restore_cross_attention(self.blocks)
        if self.sample is not None:
            self.sample.store.reset()
        self.sample = None

    def _find_layout(self) -> None:
        group = upstream_sp_group(self.model)
        if group is None:
            if self._layout is not None:
                restore_cross_attention(self.blocks)
            self._layout = None
        elif self._layout is None or self._layout.group is not group:
            self._layout = UpstreamLayout(group)
            localize_cross_attention(self.blocks)

    def _model_forward(self, forward: Any, *args: Any, **kwargs: Any) -> Any:
        if self.sample is None or self.sample.policy is None:
            return forward(*args, **kwargs)
        return self.sample.policy.model_forward(forward, args, kwargs)

    @property
    def sp(self) -> Any:
        """The sequence-parallel token layout when the tokens are split over more than one rank, else None."""
        sp = self._layout if self._layout is not None else layout_of(self.model)
        return sp if sp is not None and sp.size > 1 else None

    @property
    def caches(self) -> bool:
        """Whether this method changes anything (`none` and `steps` leave every block as it is)."""
        return not isinstance(self.config, NoneConfig)

    # -- views of the sample in progress (or, once it ended, of the last one) ----------------------------
    @property
    def _view(self) -> Sample | None:
        return self.sample if self.sample is not None else self.last

    @property
    def state(self) -> CacheState:
        return self.sample.store if self.sample is not None else CacheState()

    @property
    def plan(self) -> StepPlan | None:
        return self.sample.plan if self.sample is not None else None

    @property
    def step(self) -> int:
        return self.sample.step if self.sample is not None else -1

    @property
    def history(self) -> list[dict[str, Any]]:
        return self._view.history if self._view is not None else []

    @property
    def timesteps(self) -> tuple[float, ...]:
        return self._view.timesteps if self._view is not None else ()

    @property
    def seeds(self) -> tuple[int, ...]:
        return self._view.seeds if self._view is not None else ()

    # -- sampler events -------------------------------------------------------------------------------
    def on_sample_start(self, event: SampleStart) -> None:
        self.follower.reset()
        self.begin_sample(event)
        self.announced = True

    def on_sample_end(self) -> None:
        self.announced = False
        self.finish_sample()

    def begin_sample(self, event: SampleStart) -> None:
        self._find_layout()
        if self.sample is not None:  # an unfinished sample (e.g. interrupted) ends here
            self.sample.store.reset()
        seeds = tuple(event.seeds) if event.seeds else (event.seed or 0,) * event.batch_size
        rows = event.batch_size * (2 if event.cfg else 1)
        self.sample = Sample(
            tuple(event.timesteps), event.cfg, rows, seeds, layout=self.sp, row_group=getattr(event, "row_group", None)
        )
        if self.offload:
            self.sample.store = OffloadedState()
        self.sample.policy = self.config.make_policy(self.sample)
        self.sample.plans = self.sample.policy.mark(self.sample.policy.plan())
        self.cache_bytes = 0

    def on_step_start(self, event: StepStart) -> None:
        sample = self.sample
        if sample is None or event.index >= len(sample.plans):
            raise RuntimeError("cache: step announced outside a sample (the sampler must announce the sample first)")
        sample.step, sample.plan = event.index, sample.plans[event.index]
        sample.history.append(
            {
                "step": event.index,
                "t": event.t,
                "kind": sample.plan.kind.value,
                "spatial": sample.plan.short("spatial"),
                "temporal": sample.plan.short("temporal"),
                "recomputed": {},
                "tokens": {},
            }
        )

    def finish_sample(self) -> None:
        if self.sample is None:
            return
        self.cache_bytes = self.sample.store.peak_bytes
        # What the device held of it: all of it, or with offload about two blocks' worth (and the stack tensors).
        self.device_cache_bytes = getattr(self.sample.store, "resident_peak_bytes", self.cache_bytes)
        self.sample.store.reset()
        self.sample.now, self.sample.tokens, self.sample.plan, self.sample.policy = (
            StepState(),
            TokenScratch(),
            None,
            None,
        )
        self.last, self.sample = self.sample, None

    # -- the block --------------------------------------------------------------------------------------
    def _block_forward(self, index, block, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None):
        sample = self.sample
        if sample is None or sample.plan is None:
            return type(block).forward(block, x, y, t, mask, x_mask, t0, T, S)
        last = index == len(self.blocks) - 1
        if index == 0:
            self._start_stack(sample, block, x, y, mask, t, T, S)
        if sample.now.skip_stack:
            return sample.policy.reuse_stack(sample.now.stack_in, sample.now.pass_x) if last else x
        rows = sample.now.compute_rows
        if rows is not None:  # some videos skip this step: the blocks run on the computing videos' rows only
            x = x.index_select(0, rows) if x.shape[0] == sample.rows else x
            y, mask = caption_rows(sample, y, mask)
            t, x_mask, t0 = (None if a is None else a.index_select(0, rows) for a in (t, x_mask, t0))
        out = self._run_held(sample, index, block, BlockCall(x, y, t, mask, x_mask, t0, T, S))
        if index == 0 and not last and sample.now.compute_rows is None:
            decision = self._replayed(sample, after_first=True)
            if decision is None:
                decision = sample.policy.after_first_block(sample.now.stack_in, out)
            if self._apply(sample, decision, out, after_first_block=True) and sample.now.compute_rows is not None:
                return out.index_select(0, sample.now.compute_rows)
        elif last:
            if rows is not None:  # the skipped videos' rows, then the computed ones in their places
                out = sample.policy.reuse_stack(sample.now.stack_in, sample.now.pass_x).index_copy(0, rows, out)
            sample.policy.update_stack(sample.now.stack_in, out)
            sample.now = StepState()
        return out

    def _run_held(self, sample: Sample, index: int, block: nn.Module, call: BlockCall) -> torch.Tensor:
        """The block, with an offloaded cache's share of it on the device only while it runs; the next block's
        share is prefetched meanwhile, when this step reads it (the static plan says so)."""
        ctx = StepContext.of(sample, self.selector, self.folder)
        store = sample.store
        if not isinstance(store, OffloadedState):
            return run_block(ctx, index, block, call)
        store.enter(index)
        following = index + 1
        if following < len(self.blocks) and self._reads_cache(store, following):
            store.prefetch(following)
        try:
            return run_block(ctx, index, block, call)
        finally:
            store.release(index)

    def _reads_cache(self, store: CacheState, index: int) -> bool:
        """Whether block `index` reads its cache at this step: a reused or partly recomputed module, the folded
        tensor, or a policy whose update reads older values; a block that computes every module only drops."""
        kind = "temporal" if self.blocks[index].temporal else "spatial"
        if any(a is not Action.COMPUTE for a in self.sample.plan.actions[kind].values()):
            return True
        return store.has(index, "folded") or (self.config.reads_on_update and bool(store.names(index)))

    def _replayed(self, sample: Sample, after_first: bool = False) -> bool | list[bool] | None:
        """On a FLOP replay, the real run's decision for this step (meta tensors carry no signal): True (compute),
        False (skip) or one bool per video; None when this is no replay of a data-dependent method."""
        if self.replay_kinds is None or not self.config.data_dependent:
            return None
        return StepRecord.parse(self.replay_kinds[sample.step]).computes(after_first, sample.videos)

    def _start_stack(
        self, sample: Sample, block: nn.Module, x: torch.Tensor, y: Any, mask: Any, t: torch.Tensor, T, S
    ) -> None:
        if self._layout is not None:  # upstream's split of this forward: S is this rank's share
            self._layout.set_local(S)
        if sample.tokens.predraw_due:  # the sample's first forward: the token grid is known from now on
            sample.tokens.predraw_due = False
            if self.selector is not None:
                self.selector.predraw_sample(sample, x, T)
        sample.now = StepState(stack_in=x, pass_x=x)
        if isinstance(sample.store, OffloadedState):
            sample.store.release_all()
        # Per-video decisions need the captions row by row: ours are, upstream packs them into one sequence and
        # passes each row's length (which is enough to cut them apart).
        packed = isinstance(y, torch.Tensor) and y.shape[0] == 1 and isinstance(mask, (list, tuple))
        sample.per_video = isinstance(y, torch.Tensor) and (y.shape[0] == x.shape[0] or packed)
        decision = self._replayed(sample)
        if decision is None:
            decision = sample.policy.compute_stack(block, x, t)
        if sample.history:
            sample.history[-1]["kind"] = sample.plan.kind.value
        self._apply(sample, decision, x, after_first_block=False)

    def _apply(self, sample: Sample, decision: bool | list[bool], x: torch.Tensor, after_first_block: bool) -> bool:
        """Carry out a decision to compute (True), skip (False) or compute some videos (one bool per video);
        `x` is what the skipped rows are rebuilt from. Returns whether something is skipped."""
        videos = [bool(decision)] * sample.videos if isinstance(decision, bool) else list(decision)
        if not sample.per_video and not all(videos) and any(videos):  # rows cannot be sliced: all or nothing
            videos = [True] * sample.videos
        if all(videos):
            return False
        sample.now.pass_x = x
        if sample.history:
            sample.history[-1]["kind"] = StepRecord.skipped(after_first_block, videos).label
        if not any(videos):
            sample.now.skip_stack = True
            return True
        sample.now.compute_list = sample.rows_of([v for v, computes in enumerate(videos) if computes])
        sample.now.compute_rows = torch.tensor(sample.now.compute_list, device=x.device)
        return True

    # -- reporting -------------------------------------------------------------------------------------
    def summary(self) -> str:
        """What each step did and the share of tokens recomputed per module (see `report.summary_text`)."""
        return summary_text(self.config, self.history, self.cache_bytes)

    def schedule(self, timesteps: tuple[float, ...]) -> list[dict[str, str]]:
        return schedule_table(build_schedule(self.config, tuple(timesteps)))


def enable(
    model: nn.Module,
    method: str | CacheConfig = "duca",
    *,
    fold: bool = True,
    scheduler: Any = None,
    num_sampling_steps: int | None = None,
    seed: int | tuple[int, ...] | None = None,
    offload: bool = False,
    **overrides: Any,
) -> CacheController:
    """Turn caching on for `model` (ours or upstream's STDiT3); returns the controller (summary, bytes).

    A sampler that announces its samples (ours) needs nothing more. For one that does not (upstream's
    `RFLOW.sample`), pass its settings: `scheduler=` the sampler object (or Open-Sora's scheduler dict), or
    `num_sampling_steps=N` for Open-Sora 1.2's inference sampler; `seed=` seeds the token selection then (one
    int, or one per video; default 0). `fold=False` keeps every module output separately (more memory, same
    result up to rounding). `offload=True` keeps the cache in host memory (pinned on CUDA) and brings each block's
    share to the device while the block before it runs, on a side stream (same result; device cache memory
    bounded by about two blocks')."""
    _check_model(model)
    seed = check_seed(seed, "cache.enable")
    config = make_config(method, **overrides)
    settings = settings_from(scheduler, num_sampling_steps)
    wanted = config.sampler_settings().get("num_sampling_steps")
    if wanted is not None and settings is not None and settings.num_sampling_steps != wanted:
        raise ValueError(
            f"cache method {config.method!r} (num_steps={wanted}) is a sampler setting: the sampler given runs "
            f"{settings.num_sampling_steps} steps; set its num_sampling_steps instead"
        )
    disable(model)
    controller = CacheController(model, config, fold=fold, settings=settings, seed=seed, offload=offload)
    controller.install()
    return controller


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"cache.enable: model must be an STDiT3 (torch.nn.Module), got {type(model).__name__}")


def disable(model: nn.Module) -> None:
    """Remove the cache from `model`; its blocks run their own forward again."""
    controller = model.__dict__.get(_ATTR)
    if controller is not None:
        controller.remove()


def controller_of(model: nn.Module) -> CacheController | None:
    return model.__dict__.get(_ATTR)
