"""The cache plugin: `enable(model, method)` wraps every STDiT3 block of a model and follows the schedule.

It needs nothing but Open-Sora's block attribute names (`attn`, `cross_attn`, `mlp`, `norm1`, `norm2`,
`scale_shift_table`, `temporal`) and the block call signature `(x, y, t, mask, x_mask, t0, T, S)`, so it works
on our STDiT3 and on an upstream Open-Sora model instance alike. It learns where sampling is from the sampler's
events (see `duca_video.sampling.events`) or, for a sampler that announces nothing (upstream's `RFLOW.sample`),
from the model's own forward calls and the sampler's settings (`follow.py`). Under upstream's sequence
parallelism it reads upstream's group (`upstream.py`).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..models.stdit3 import block_modulation, block_self_attention, gate_tokens, modulate_tokens
from ..parallel.comm import all_reduce_sum
from ..sampling.events import SampleStart, StepStart, register_listener, unregister_listener
from . import selection as sel
from .config import CacheConfig, NoneConfig, StepsConfig, TeaCacheConfig, TokenCacheConfig, make_config
from .folding import FoldingMixin, rows_param, write_rows
from .follow import SampleFollower, SamplingSettings, settings_from
from .schedule import Action, StepPlan, build_schedule, schedule_table
from .state import STACK, CacheState
from .tokens import SelectionMixin
from .upstream import UpstreamLayout, localize_cross_attention, restore_cross_attention, upstream_sp_group

BLOCK_ATTRS = ("attn", "cross_attn", "mlp", "norm1", "norm2", "scale_shift_table", "temporal")
_ATTR = "_duca_cache_controller"


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """STDiT3 blocks in execution order (spatial 0, temporal 0, spatial 1, ...)."""
    if hasattr(model, "spatial_blocks") and hasattr(model, "temporal_blocks"):
        pairs = zip(model.spatial_blocks, model.temporal_blocks, strict=True)
        blocks = [b for pair in pairs for b in pair]
    else:
        blocks = [m for m in model.modules() if all(hasattr(m, a) for a in BLOCK_ATTRS)]
    missing = [a for a in BLOCK_ATTRS if blocks and not hasattr(blocks[0], a)]
    if not blocks or missing:
        raise ValueError(
            f"{type(model).__name__} has no STDiT3 blocks: the cache needs blocks with attributes {BLOCK_ATTRS}"
        )
    return blocks


@contextmanager
def _capture_output(module: nn.Module, sink: dict[str, torch.Tensor], key: str, enabled: bool):
    """Keep `module`'s output (e.g. the qkv projection) while a full step computes it anyway."""
    if not enabled:
        yield
        return
    handle = module.register_forward_hook(lambda _m, _i, out: sink.__setitem__(key, out))
    try:
        yield
    finally:
        handle.remove()


class CacheController(FoldingMixin, SelectionMixin):
    """Listens to the sampler, holds the per-sample cache state and runs every block through the schedule."""

    def __init__(
        self,
        model: nn.Module,
        config: CacheConfig,
        fold: bool = True,
        settings: SamplingSettings | None = None,
        seed: int | tuple[int, ...] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.follower = SampleFollower(self, settings, seed)
        self.announced = False  # a sampler announced the sample in progress
        self.rows = 0  # model batch rows of the sample in progress
        self._layout: UpstreamLayout | None = None  # upstream's sequence parallelism, when the model uses it
        # Folding stores `gate_msa(t') * attn + cross + gate_mlp(t') * mlp` as one tensor for the single
        # conservative step t' that reads it (plus the rows it recomputes), instead of three tensors.
        self.fold = fold and all(hasattr(model, a) for a in ("fps_embedder", "t_embedder", "t_block"))
        self._fps_emb: torch.Tensor | None = None
        self._next_t_mlp: tuple[int, torch.Tensor] | None = None
        self._hooks: list[Any] = []
        self.blocks = find_blocks(model)
        self.state = CacheState()
        self.plans: list[StepPlan] | None = None
        self.plan: StepPlan | None = None
        self.step = -1
        self.cfg = False
        self.seeds: tuple[int, ...] = ()  # one per video of the batch
        self.timesteps: tuple[float, ...] = ()
        self.history: list[dict[str, Any]] = []
        self.cache_bytes = 0  # peak bytes of the last finished (or current) sample
        self._skip_stack = False
        self._stack_in: torch.Tensor | None = None
        self._tea_accumulated = 0.0
        # FLOP replays on the meta device (metrics.flops.SamplingFlops): TeaCache's per-step kinds of a real run.
        self.replay_kinds: list[str] | None = None

    # -- installation ---------------------------------------------------------------------------------
    def install(self) -> None:
        for index, block in enumerate(self.blocks):
            block.forward = functools.partial(self._block_forward, index, block)
        register_listener(self.model, self)
        self.model.__dict__[_ATTR] = self
        self._hooks.append(self.model.register_forward_pre_hook(self.follower.before, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self.follower.after, with_kwargs=True))
        self._find_layout()
        if self.fold:  # the fps embedding of this forward, to compute the next step's modulation
            hook = self.model.fps_embedder.register_forward_hook(lambda _m, _i, out: setattr(self, "_fps_emb", out))
            self._hooks.append(hook)

    def remove(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        unregister_listener(self.model, self)
        self.model.__dict__.pop(_ATTR, None)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        restore_cross_attention(self.blocks)
        self.state.reset()

    def _find_layout(self) -> None:
        group = upstream_sp_group(self.model)
        if group is None:
            if self._layout is not None:
                restore_cross_attention(self.blocks)
            self._layout = None
        elif self._layout is None or self._layout.group is not group:
            self._layout = UpstreamLayout(group)
            localize_cross_attention(self.blocks)

    @property
    def caches(self) -> bool:
        """Whether this method changes anything (`none` and `steps` leave every block as it is)."""
        return not isinstance(self.config, (NoneConfig, StepsConfig))

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
        self.rows = event.batch_size * (2 if event.cfg else 1)
        self.state.reset()
        self.timesteps = tuple(event.timesteps)
        self.plans = build_schedule(self.config, self.timesteps)
        self.cfg = event.cfg
        self.seeds = tuple(event.seeds) if event.seeds else (event.seed or 0,) * event.batch_size
        self.history, self.step, self.plan = [], -1, None
        self._tea_accumulated = 0.0
        self.cache_bytes = 0
        self._drawn, self._picked, self._predraw_due = None, None, True

    def on_step_start(self, event: StepStart) -> None:
        if self.plans is None or event.index >= len(self.plans):
            raise RuntimeError("cache: step announced outside a sample (the sampler must announce the sample first)")
        self.step, self.plan = event.index, self.plans[event.index]
        self._skip_stack = self.plan.kind == "aggressive"
        self.history.append({"step": event.index, "t": event.t, "kind": self.plan.kind,
                             "spatial": self.plan.short("spatial"), "temporal": self.plan.short("temporal"),
                             "recomputed": {}, "tokens": {}})  # fmt: skip

    def finish_sample(self) -> None:
        self.cache_bytes = self.state.peak_bytes
        self.state.reset()
        self.plans, self.plan, self._stack_in = None, None, None
        self._fps_emb, self._next_t_mlp = None, None
        self._drawn, self._picked = None, None

    # -- the block --------------------------------------------------------------------------------------
    def _block_forward(self, index, block, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None):
        if self.plan is None:
            return type(block).forward(block, x, y, t, mask, x_mask, t0, T, S)
        last = index == len(self.blocks) - 1
        if index == 0:
            if self._layout is not None:  # upstream's split of this forward: S is this rank's share
                self._layout.set_local(S)
            if self._predraw_due:  # the sample's first forward: the token grid is known from now on
                self._predraw_due = False
                self._predraw(x, T)
            self._stack_in = x
            if isinstance(self.config, TeaCacheConfig):
                self._teacache_decide(block, x, t)
            elif not self._skip_stack:  # only aggressive steps read the stack output: free it before computing
                self.state.drop(STACK, "output")
        if self._skip_stack:
            return self._reuse_stack(x) if last else x
        out = self._run_block(index, block, x, y, t, mask, x_mask, t0, T, S)
        if last:
            self._store_stack(out)
        return out

    def _reuse_stack(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.config, TeaCacheConfig):
            return self._stack_in + self.state.get(STACK, "residual")
        return self.state.get(STACK, "output")

    def _store_stack(self, out: torch.Tensor) -> None:
        if isinstance(self.config, TeaCacheConfig):
            self.state.put(STACK, "residual", out - self._stack_in)
        elif self.plan.keep_stack:
            self.state.put(STACK, "output", out)
        else:
            self.state.drop(STACK, "output")
        self._stack_in = None

    def _teacache_decide(self, block: nn.Module, x: torch.Tensor, t: torch.Tensor) -> None:
        if self.replay_kinds is not None:  # meta tensors carry no signal: repeat the real run's decisions
            self._skip_stack = self.replay_kinds[self.step] == "aggressive"
            if self.history:
                self.history[-1]["kind"] = "aggressive" if self._skip_stack else "full"
            return
        shift, scale = block_modulation(block, t)[:2]
        current = modulate_tokens(block.norm1(x), shift, scale)
        previous = self.state.get(STACK, "modulated_input")
        first_or_last = self.step in (0, len(self.timesteps) - 1)
        compute = True
        if not first_or_last and previous is not None:
            change, size = (current - previous).abs(), previous.abs()
            if self.sp:  # the signal must be the whole grid's, identical on every rank
                valid = self.sp.local_valid(x.shape[1] // self.sp.s_local, x.device)[None, :, None]
                sums = torch.stack([(change * valid).sum(), (size * valid).sum()]).double()
                sums = all_reduce_sum(sums, self.sp.group, self.sp.stats, "teacache_signal")
                rel = (sums[0] / sums[1]).item()
            else:
                rel = (change.mean() / size.mean()).item()
            coeffs = self.config.coefficients
            self._tea_accumulated += sum(c * rel ** (len(coeffs) - 1 - i) for i, c in enumerate(coeffs))
            compute = self._tea_accumulated >= self.config.threshold
        if compute:
            self._tea_accumulated = 0.0
        self.state.put(STACK, "modulated_input", current)
        self._skip_stack = not compute
        if self.history:
            self.history[-1]["kind"] = "full" if compute else "aggressive"

    def _needs_scores(self, kind: str) -> str | None:
        """Which selector statistic this full step must capture for later conservative steps."""
        cfg = self.config
        if not isinstance(cfg, TokenCacheConfig) or not cfg.recompute:
            return None
        if cfg.selector in ("k_norm", "v_norm") and self.plan.action(kind, "attn") is Action.COMPUTE:
            return "qkv"
        if cfg.selector == "cross_entropy" and self.plan.action(kind, "cross") is Action.COMPUTE:
            return "cross"
        return None

    def _run_block(self, index, block, x, y, t, mask, x_mask, t0, T, S):
        kind = "temporal" if block.temporal else "spatial"
        acts, keep = self.plan.actions[kind], self.plan.keep[kind]
        if self.state.has(index, "folded"):
            return self._run_folded(index, block, x, t, x_mask, t0, S, acts)
        capture = self._needs_scores(kind)
        plain = all(a is Action.COMPUTE for a in acts.values()) and not keep and capture is None
        if plain:
            for name in self.state.names(index):
                if name != "age":
                    self.state.drop(index, name)
            return type(block).forward(block, x, y, t, mask, x_mask, t0, T, S)

        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block_modulation(block, t, x_mask, t0)
        partial = Action.PARTIAL in acts.values()
        idx, pad = self._select(index, x, T, S) if partial else (None, None)
        stats = self.history[-1] if self.history else None
        grabbed: dict[str, torch.Tensor] = {}

        # self-attention (a partial recompute needs every token's keys and values, so it runs in full and
        # only the selected rows refresh the cache)
        act = acts["attn"]
        if act is Action.REUSE:
            attn = self.state.get(index, "attn")
        else:
            with _capture_output(block.attn.qkv, grabbed, "qkv", capture == "qkv"):
                attn = block_self_attention(block, modulate_tokens(block.norm1(x), shift_msa, scale_msa), T, S)
            if act is Action.PARTIAL:
                attn = write_rows(self.state.get(index, "attn"), idx, pad, sel.gather_tokens(attn, idx))
        x = x + gate_tokens(gate_msa, attn)

        act = acts["cross"]
        if act is Action.REUSE:
            cross = self.state.get(index, "cross")
        elif act is Action.PARTIAL:
            rows = block.cross_attn(sel.gather_tokens(x, idx), y, mask)
            cross = write_rows(self.state.get(index, "cross"), idx, pad, rows)
        else:
            with (
                _capture_output(block.cross_attn.q_linear, grabbed, "q", capture == "cross"),
                _capture_output(block.cross_attn.kv_linear, grabbed, "kv", capture == "cross"),
            ):
                cross = block.cross_attn(x, y, mask)
        x = x + cross

        act = acts["mlp"]
        if act is Action.REUSE:
            mlp = self.state.get(index, "mlp")
        elif act is Action.PARTIAL:
            rows = sel.gather_tokens(x, idx)
            h = block.norm2(rows) * (1 + rows_param(scale_mlp, idx, S)) + rows_param(shift_mlp, idx, S)
            mlp = write_rows(self.state.get(index, "mlp"), idx, pad, block.mlp(h))
        else:
            mlp = block.mlp(modulate_tokens(block.norm2(x), shift_mlp, scale_mlp))
        x = x + gate_tokens(gate_mlp, mlp)

        fold = x_mask is None and self._can_fold(kind)
        if fold:  # the folded tensor serves the next step; keep separately only what a later step reads
            keep = keep & self.plans[self.step + 1].keep[kind]
        for module, value in (("attn", attn), ("cross", cross), ("mlp", mlp)):
            if module in keep:
                self.state.put(index, module, value)
            else:
                self.state.drop(index, module)
            if stats is not None:
                n = value.shape[0] * value.shape[1]
                done = (
                    n
                    if acts[module] is Action.COMPUTE
                    else (self._rows_picked(idx, pad) if acts[module] is Action.PARTIAL else 0)
                )
                stats["recomputed"][module] = stats["recomputed"].get(module, 0) + done
                stats["tokens"][module] = stats["tokens"].get(module, 0) + n
        if capture:
            self._store_scores(index, block, grabbed, mask, T, S)
        if fold:
            self._store_folded(index, block, x.shape[0], attn, cross, mlp, T, S, x)
        return x

    # -- reporting -------------------------------------------------------------------------------------
    def summary(self) -> str:
        """What each step did (C = computed, R = reused, P = partly recomputed; for attn / cross / mlp of the
        spatial and temporal blocks) and the share of tokens recomputed per module."""
        header = f"{'step':>4} {'t':>8}  {'kind':<12} {'spatial':<8} {'temporal':<8} recomputed (attn/cross/mlp)"
        lines = [f"cache method {self.config.method}: {self.config.to_dict()}", header]
        counts: dict[str, int] = {}
        for h in self.history:
            counts[h["kind"]] = counts.get(h["kind"], 0) + 1
            share = "/".join(
                f"{100 * h['recomputed'].get(m, 0) / h['tokens'][m]:.1f}%" if h["tokens"].get(m) else "-"
                for m in ("attn", "cross", "mlp")
            )
            if h["kind"] == "aggressive":
                share = "stack reused"
            lines.append(f"{h['step']:>4} {h['t']:>8.2f}  {h['kind']:<12} {h['spatial']:<8} {h['temporal']:<8} {share}")
        lines.append(f"steps: {counts}; peak cache {self.cache_bytes / 2**20:.1f} MiB")
        return "\n".join(lines)

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
    **overrides: Any,
) -> CacheController:
    """Turn caching on for `model` (ours or upstream's STDiT3); returns the controller (summary, bytes).

    A sampler that announces its samples (ours) needs nothing more. For one that does not (upstream's
    `RFLOW.sample`), pass its settings: `scheduler=` the sampler object (or Open-Sora's scheduler dict), or
    `num_sampling_steps=N` for Open-Sora 1.2's inference sampler; `seed=` seeds the token selection then (one
    int, or one per video; default 0). `fold=False` keeps every module output separately (more memory, same
    result up to rounding)."""
    config = make_config(method, **overrides)
    settings = settings_from(scheduler, num_sampling_steps)
    if isinstance(config, StepsConfig) and settings is not None and settings.num_sampling_steps != config.num_steps:
        raise ValueError(
            f"cache method 'steps' (num_steps={config.num_steps}) is a sampler setting: the sampler given runs "
            f"{settings.num_sampling_steps} steps; set its num_sampling_steps instead"
        )
    disable(model)
    controller = CacheController(model, config, fold=fold, settings=settings, seed=seed)
    controller.install()
    return controller


def disable(model: nn.Module) -> None:
    """Remove the cache from `model`; its blocks run their own forward again."""
    controller = model.__dict__.get(_ATTR)
    if controller is not None:
        controller.remove()


def controller_of(model: nn.Module) -> CacheController | None:
    return model.__dict__.get(_ATTR)
