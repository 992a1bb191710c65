"""The cache plugin: `enable(model, method)` wraps every STDiT3 block of a model and follows the schedule.

It needs nothing but Open-Sora's block attribute names (`attn`, `cross_attn`, `mlp`, `norm1`, `norm2`,
`scale_shift_table`, `temporal`) and the block call signature `(x, y, t, mask, x_mask, t0, T, S)`, so it works
on our STDiT3 and on an upstream Open-Sora model instance alike. It learns where sampling is from the sampler's
events (see `duca_video.sampling.events`); outside a sample every block runs its own forward untouched.
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
from .config import CacheConfig, TeaCacheConfig, TokenCacheConfig, make_config
from .folding import FoldingMixin, count_rows, rows_param, write_rows
from .schedule import Action, StepPlan, build_schedule, schedule_table
from .state import STACK, CacheState

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


class CacheController(FoldingMixin):
    """Listens to the sampler, holds the per-sample cache state and runs every block through the schedule."""

    def __init__(self, model: nn.Module, config: CacheConfig, fold: bool = True) -> None:
        self.model = model
        self.config = config
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
        self.state.reset()

    # -- sampler events -------------------------------------------------------------------------------
    def on_sample_start(self, event: SampleStart) -> None:
        self.state.reset()
        self.timesteps = tuple(event.timesteps)
        self.plans = build_schedule(self.config, self.timesteps)
        self.cfg = event.cfg
        self.seeds = tuple(event.seeds) if event.seeds else (event.seed or 0,) * event.batch_size
        self.history, self.step, self.plan = [], -1, None
        self._tea_accumulated = 0.0
        self.cache_bytes = 0

    def on_step_start(self, event: StepStart) -> None:
        if self.plans is None or event.index >= len(self.plans):
            raise RuntimeError("cache: step announced outside a sample (the sampler must announce the sample first)")
        self.step, self.plan = event.index, self.plans[event.index]
        self._skip_stack = self.plan.kind == "aggressive"
        self.history.append({"step": event.index, "t": event.t, "kind": self.plan.kind,
                             "spatial": self.plan.short("spatial"), "temporal": self.plan.short("temporal"),
                             "recomputed": {}, "tokens": {}})  # fmt: skip

    def on_sample_end(self) -> None:
        self.cache_bytes = self.state.peak_bytes
        self.state.reset()
        self.plans, self.plan, self._stack_in = None, None, None
        self._fps_emb, self._next_t_mlp = None, None

    # -- the block --------------------------------------------------------------------------------------
    def _block_forward(self, index, block, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None):
        if self.plan is None:
            return type(block).forward(block, x, y, t, mask, x_mask, t0, T, S)
        last = index == len(self.blocks) - 1
        if index == 0:
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
                    else (count_rows(idx, pad) if acts[module] is Action.PARTIAL else 0)
                )
                stats["recomputed"][module] = stats["recomputed"].get(module, 0) + done
                stats["tokens"][module] = stats["tokens"].get(module, 0) + n
        if capture:
            self._store_scores(index, block, grabbed, mask, T, S)
        if fold:
            self._store_folded(index, block, x.shape[0], attn, cross, mlp, T, S, x)
        return x

    # -- token selection -------------------------------------------------------------------------------
    def _store_scores(self, index, block, grabbed, mask, T, S) -> None:
        cfg = self.config
        if cfg.selector in ("k_norm", "v_norm"):
            qkv = grabbed["qkv"]  # (B*T, S, 3C) spatial or (B*S, T, 3C) temporal
            c = qkv.shape[-1] // 3
            part = qkv[..., c : 2 * c] if cfg.selector == "k_norm" else qkv[..., 2 * c :]
            scores = sel.norm_scores(part)
            if block.temporal:
                scores = scores.view(-1, S, T).transpose(1, 2)
            scores = scores.reshape(-1, T * S)
        else:
            q, kv = grabbed["q"], grabbed["kv"]  # q (B, N, C); kv (B, L, 2C), or upstream's packed (1, sum L, 2C)
            c = q.shape[-1]
            keys, key_mask = kv[..., :c], mask
            if isinstance(mask, (list, tuple)):  # upstream passes the valid text lengths instead of a mask
                keys = nn.utils.rnn.pad_sequence(list(keys.reshape(-1, c).split(list(mask))), batch_first=True)
                lengths = torch.tensor(list(mask), device=keys.device)
                key_mask = torch.arange(keys.shape[1], device=keys.device)[None] < lengths[:, None]
            elif key_mask is not None:
                key_mask = key_mask.bool()
            scores = sel.attention_entropy(q, keys, key_mask, getattr(block.cross_attn, "num_heads", 1))
        scores = scores.float()
        if self.sp:  # selection looks at the whole grid: every rank gets every token's score
            scores = self.sp.gather_scores(scores, T)
        self.state.put(index, "scores", scores)

    @property
    def sp(self):
        sp = getattr(self.model, "sp", None)
        return sp if sp is not None and sp.size > 1 else None

    def _select(
        self, index: int, x: torch.Tensor, T: int, S: int, step: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens to recompute at `step` (default: the current one): (indices (B, k), padding mask or None).

        The draw depends on (video seed, step, block) only. Under sequence parallelism the scores cover the whole
        grid, identical on every rank, and each rank keeps its share: the same choice as one process."""
        cfg, sp = self.config, self.sp
        rows = x.shape[0]
        n = T * sp.s_global if sp else x.shape[1]
        k = round(cfg.recompute_ratio * n)
        draw = (self.seeds, self.step if step is None else step, index)
        if cfg.selector == "random":
            scores = sel.random_scores(rows, n, self.cfg, *draw)
        elif cfg.selector == "random_frame":
            scores = sel.random_frame_scores(rows, T, n // T, self.cfg, *draw)
        elif cfg.selector in ("min_similarity", "max_similarity"):
            if sp:
                raise ValueError(f"selector {cfg.selector!r} compares tokens across the whole grid at the step"
                                 " itself; it is not supported with sequence parallelism, use another one")  # fmt: skip
            gens = sel.row_generators(*draw, rows, self.cfg)
            scores = sel.similarity_scores(x, 0.01, cfg.selector == "min_similarity", gens)
        else:
            scores = self.state.get(index, "scores")
            if scores is None:
                raise RuntimeError(f"cache: selector {cfg.selector!r} has no scores for block {index}")
        # On the meta device (counting runs) the choice is made on the CPU, where the random draws are; scores
        # computed from meta tensors have no values, and which tokens are picked does not change the cost.
        scores = torch.zeros(scores.shape) if scores.is_meta else scores.to("cpu" if x.is_meta else x.device)
        if cfg.age_bonus > 0:
            age = self.state.get(index, "age")
            if age is None:
                age = self.state.put(index, "age", torch.zeros(rows, n, device=scores.device))
            scores = scores + cfg.age_bonus * age
        idx = sel.top_k(scores, k)
        if cfg.age_bonus > 0:
            age += 1
            age.scatter_(1, idx, 0.0)
        idx, pad = sp.to_local(idx, T) if sp else (idx, None)
        return idx.to(x.device), None if pad is None else pad.to(x.device)

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
    model: nn.Module, method: str | CacheConfig = "duca", *, fold: bool = True, **overrides: Any
) -> CacheController:
    """Turn caching on for `model` (ours or upstream's STDiT3); returns the controller (summary, bytes).

    `fold=False` keeps every module output separately (more memory, same result up to rounding)."""
    config = make_config(method, **overrides)
    disable(model)
    controller = CacheController(model, config, fold=fold)
    controller.install()
    return controller


def disable(model: nn.Module) -> None:
    """Remove the cache from `model`; its blocks run their own forward again."""
    controller = model.__dict__.get(_ATTR)
    if controller is not None:
        controller.remove()


def controller_of(model: nn.Module) -> CacheController | None:
    return model.__dict__.get(_ATTR)
