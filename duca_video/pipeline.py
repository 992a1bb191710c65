"""Prompts -> text embeddings -> seeded noise -> RFlow sampling (with the cache) -> VAE decode -> files.

`run(config)` is the whole job: it checks every input before loading a model (prompts, references, save folder,
weight paths, cache settings), skips videos already complete, keeps going when one batch fails, and returns a
summary (`scripts/inference.py` is the command line around it). Reference frames and loops: conditioning/.

Measurements written into each record:
- latency_s: wall time of text encoding + sampling + VAE decode (+ copy to the CPU) of the batch, divided by
  the videos in it (file writing excluded); CUDA is synchronised around it.
- dit_tflops: FLOPs of the batch's sampling loop (all steps, the CFG batch, whatever the cache skipped), divided
  by the videos in the batch. Counted after the timed window, by replaying the loop on a meta copy of the model
  (no weights, no compute) with the cache's decisions of the real run (TeaCache's per-step choice); which
  tokens a selector picks does not change the cost. So latency_s carries no counting overhead.
- peak_memory_bytes: CUDA max allocated during the batch (weights included), or on the CPU the peak resident
  set growth over the batch; `peak_memory_kind` says which.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from duca_video.conditioning.generation import needs_conditioning, sample_conditioned
from duca_video.configs import ConfigError, InferenceConfig
from duca_video.configs.build import build_model, build_text_encoder, build_vae
from duca_video.configs.preflight import InputError, check_cache_settings, resolve_device, resolve_weights
from duca_video.configs.schema import TORCH_DTYPES
from duca_video.io import check_writable, is_storage_full, remove_stale_temps, to_uint8_frames
from duca_video.jobs import (
    RunSummary,
    VideoIdentity,
    VideoJob,
    batch_jobs,
    claim_batch,
    data_parallel_share,
    finish_summary,
    load_prompts,
    plan_batches,
    scan_outputs,
    write_batch_video,
)
from duca_video.metrics.flops import SamplingFlops
from duca_video.metrics.peak import PeakMemory
from duca_video.models import STDiT3, STDiT3Config
from duca_video.models.checkpoint import read_config
from duca_video.models.text_encoder import null_caption
from duca_video.parallel.cfg import parallelize_cfg
from duca_video.parallel.group_work import GroupRunner, TextShape
from duca_video.parallel.launch import ParallelContext, init_parallel
from duca_video.parallel.sequence import SequenceParallel, check_sp_size, parallelize_stdit3
from duca_video.sampling.rflow import RFlowSampler

__all__ = ["Generated", "InputError", "Models", "VideoJob", "generate", "load_models", "run"]

log = logging.getLogger(__name__)

IMG_FPS = 120  # Open-Sora conditions single images on this frame rate


# ---------------------------------------------------------------------------------------------------- models
@dataclass
class Models:
    model: STDiT3
    vae: Any
    text_encoder: Any
    sampler: RFlowSampler
    controller: Any  # duca_video.cache controller, None for method "none"
    device: torch.device
    dtype: torch.dtype
    latent_shape: tuple[int, int, int, int]  # (C, T, H, W) of one video's latent
    method_config: dict[str, Any]
    weights: dict[str, str]
    flops_counted_by: str
    flops: SamplingFlops | None = None  # counts each batch's FLOPs on a meta copy, outside the timed window
    ctx: ParallelContext = dataclasses.field(default_factory=ParallelContext)
    sp: SequenceParallel | None = None

    @property
    def group(self) -> GroupRunner:
        """The batch's parallel work (text once per group, the CFG exchange, gathering, decoding across)."""
        return GroupRunner(self.ctx, self.sp, self.device)


def _text_encoder(cfg: InferenceConfig, path: str | None, device: torch.device, ctx: ParallelContext) -> Any:
    """The encoder on the group's writer; the other ranks of an SP group receive its output instead."""
    if ctx.is_writer or cfg.text_encoder.type != "t5" or path is None:
        return build_text_encoder(cfg, path, device)
    width = int((read_config(path) or {}).get("d_model", 4096))
    return TextShape(width, cfg.text_encoder.model_max_length or 300)


def load_models(
    cfg: InferenceConfig, weights: dict[str, str | None], device: torch.device, ctx: ParallelContext | None = None
) -> Models:
    ctx = ctx or ParallelContext()
    dtype = TORCH_DTYPES[cfg.dtype]
    encoder = _text_encoder(cfg, weights["text_encoder"], device, ctx)
    vae = build_vae(cfg, weights["vae"], device, dtype)
    latent = vae.get_latent_size((cfg.num_frames, *cfg.size))
    if any(s is None or s < 1 for s in latent):
        raise InputError(
            f"{cfg.num_frames} frames of {cfg.size[0]}x{cfg.size[1]} give latent size {latent}, "
            "which the VAE cannot produce: use a larger image_size"
        )
    model, source = build_model(cfg, weights["model"], vae, encoder, device, dtype)
    # Sharded mode: each rank keeps its positions of the latent; gathered once per sample (see parallel/).
    sp = parallelize_stdit3(model, ctx.sp_group, gather_output=False) if ctx.sp_size > 1 else None
    sampler = RFlowSampler(**{k: v for k, v in dataclasses.asdict(cfg.scheduler).items() if k != "type"})
    controller, method_config = None, {}
    if cfg.cache.method != "none":
        from duca_video import cache as cache_lib

        try:
            controller = cache_lib.enable(model, cfg.cache.method, offload=cfg.cache.offload, **cfg.cache.overrides)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cache: {exc}") from None
        method_config = dataclasses.asdict(controller.config)
        for name, value in controller.config.sampler_settings().items():  # e.g. `steps`: fewer sampler steps
            setattr(sampler, name, value)
    if cfg.compile:  # after the cache and SP wrap the model: the cache's Python stays out of the graphs
        from duca_video.cache import compile_blocks

        compile_blocks(model)
    if ctx.cfg_size > 1:  # last: over the cache's own wrapping of the forward, which then sees this rank's half
        parallelize_cfg(model, ctx.cfg_group)
    names = {"model": source, "vae": weights["vae"] or cfg.vae.type, "text_encoder": weights["text_encoder"]}
    names["text_encoder"] = names["text_encoder"] or f"{cfg.text_encoder.type} (random init, seed {cfg.seed})"
    counted_by = (
        "FlopCounterMode over a meta-device replay of the batch's sampling loop after the timed run "
        "(all steps, CFG batch, the cache's decisions of this run; single-device count)"
    )
    flops = None
    if cfg.count_flops:
        flops = SamplingFlops(model, dtype, None if controller is None else controller.config, sampler)
    return Models(
        model,
        vae,
        encoder,
        sampler,
        controller,
        device,
        dtype,
        (int(vae.out_channels), *latent),
        method_config,
        names,
        counted_by,
        flops,
        ctx,
        sp,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- generating
@dataclass
class Generated:
    latents: torch.Tensor  # (B, C, T, H, W), the sampler's output before the VAE
    frames: list[torch.Tensor]  # per video (T, H, W, 3) uint8 on the CPU
    batch_latency_s: float
    dit_flops: int | None  # whole batch
    peak_memory_bytes: int
    peak_memory_kind: str
    cache_bytes: int


def _size_kwargs(m: Models, cfg: InferenceConfig, k: int) -> dict[str, torch.Tensor]:
    # Sizes stay on the CPU (the model reads their values; on the device that is a sync per forward), in the
    # model dtype as upstream; fps feeds an embedding, so it goes to the device.
    fps = IMG_FPS if cfg.num_frames == 1 else cfg.fps
    sizes = (("height", cfg.size[0]), ("width", cfg.size[1]), ("num_frames", cfg.num_frames))
    kwargs = {key: torch.full((k,), float(value), dtype=m.dtype) for key, value in sizes}
    return {**kwargs, "fps": torch.full((k,), float(fps), device=m.device, dtype=m.dtype)}


@torch.no_grad()
def generate(models: Models, cfg: InferenceConfig, jobs: list[VideoJob], progress: bool) -> Generated:
    """One batch: every video gets its own noise from a generator seeded with its seed (on the CPU, so the
    same seed gives the same video on any device and in any batch)."""
    m, n = models, len(jobs)
    sizes = lambda k: _size_kwargs(m, cfg, k)  # noqa: E731
    memory = PeakMemory(m.device)
    _sync(m.device)
    start = time.perf_counter()
    if needs_conditioning(jobs):  # reference frames and loops: duca_video.conditioning
        c = sample_conditioned(m, cfg, jobs, sizes, progress)
        latents, video, calls, cache_bytes = c.latents, c.video, c.calls, c.cache_bytes
    else:
        group = m.group
        y, mask = group.encode(m.text_encoder, [j.text for j in jobs])
        y_null = null_caption(m.model, n).to(m.device)  # the model's own buffer: every rank has it
        noise = [torch.randn(m.latent_shape, generator=torch.Generator().manual_seed(j.seed)) for j in jobs]
        # Upstream draws the noise and builds these inputs in the model dtype (bf16 turns width 854 into 856).
        z = torch.stack(noise).to(device=m.device, dtype=m.dtype)
        latents = group.sample(
            m.sampler,
            m.model,
            z,
            y,
            y_null,
            mask,
            model_kwargs=sizes(n),
            progress=progress,
            seed=[j.seed for j in jobs],
        )
        cache_bytes = int(m.controller.cache_bytes) if m.controller is not None else 0
        kinds = [h["kind"] for h in m.controller.history] if m.controller is not None else None
        calls = [(n, kinds, m.sampler.last_text_tokens)]
        latents = group.gather(latents, m.model.config.patch_size)
        video = group.decode(m.vae, latents.to(m.dtype), cfg.num_frames)
    frames = [] if video is None else [to_uint8_frames(v) for v in video]
    _sync(m.device)
    latency = time.perf_counter() - start
    # Counted after the timed window: the counter's per-operator overhead must not inflate latency_s.
    flops = (
        None
        if m.flops is None
        else sum(m.flops.count(k, m.latent_shape, sizes(k), kinds, tokens) for k, kinds, tokens in calls)
    )
    return Generated(latents.float().cpu(), frames, latency, flops, memory.peak_bytes(), memory.kind, cache_bytes)


# ---------------------------------------------------------------------------------------------------- the job
def run(cfg: InferenceConfig, jobs: list[VideoJob] | None = None) -> RunSummary:
    """Check every input, load the models only if something is left to do, generate, write, summarise.

    `jobs` replaces the config's prompts with a planned list (names and seeds chosen by the caller, e.g. the
    VBench suite); data-parallel groups split it the same way."""
    try:
        ctx = init_parallel(cfg.sp_size, cfg_parallel=cfg.cfg_parallel)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    planned = [j for batch in plan_batches(cfg, load_prompts(cfg)) for j in batch] if jobs is None else list(jobs)
    planned = data_parallel_share(planned, cfg.shard_count, cfg.shard_index)  # a job array's share (all: 0/1)
    # Data parallel: each SP group takes a contiguous share of the videos (seeds do not depend on it).
    mine = data_parallel_share(planned, ctx.dp_size, ctx.dp_rank)
    weights = resolve_weights(cfg)
    _check_sp_size(cfg, weights, ctx)
    check_cache_settings(cfg)
    device = resolve_device(cfg.device)
    save_dir = Path(cfg.save_dir)
    identity = VideoIdentity(cfg, weights)
    summary = RunSummary(str(save_dir), writer=ctx.is_writer)
    # Reading the folder needs no write access: a complete job on a read-only mount is reported complete.
    todo = scan_outputs(cfg, save_dir, planned, mine, identity, summary, ctx, device) if save_dir.is_dir() else None
    if todo is None or todo:
        try:  # the last check, so that a run refused for another reason creates no folder
            save_dir = check_writable(cfg.save_dir)
        except OSError as exc:
            raise InputError(f"save directory {cfg.save_dir!r} is not writable: {exc}") from None
        if ctx.is_writer:
            remove_stale_temps(save_dir)
        if todo is None:
            todo = scan_outputs(cfg, save_dir, planned, mine, identity, summary, ctx, device)
    if todo:
        models = load_models(cfg, weights, device, ctx)
        try:
            _generate_all(cfg, models, save_dir, batch_jobs(todo, cfg.batch_size), identity, summary)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            if models.controller is not None:
                from duca_video import cache as cache_lib

                cache_lib.disable(models.model)
    else:
        log.info("nothing to do: all %d video(s) in %s are complete", len(summary.skipped), save_dir)
    return finish_summary(cfg, save_dir, planned, identity, summary, ctx)


def _check_sp_size(cfg: InferenceConfig, weights: dict[str, str | None], ctx: ParallelContext) -> None:
    saved = read_config(weights["model"]) if weights["model"] else None
    heads = cfg.model.extra.get("num_heads") or (saved or {}).get("num_heads") or STDiT3Config().num_heads
    try:  # before any weight is loaded
        check_sp_size(int(heads), ctx.sp_size)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _generate_all(
    cfg: InferenceConfig,
    models: Models,
    save_dir: Path,
    batches: list[list[VideoJob]],
    identity: VideoIdentity,
    summary: RunSummary,
) -> None:
    """Every batch in turn: claim (lock) its videos, generate, write; one failed batch does not end the job."""
    bar = tqdm(total=sum(map(len, batches)), unit="video", desc="videos", disable=True if cfg.quiet else None)
    try:
        for k, batch in enumerate(batches):
            try:
                jobs, locks = claim_batch(cfg, save_dir, batch, identity, summary, models.ctx, models.device)
                try:
                    if jobs:
                        _generate_batch(cfg, models, save_dir, jobs, identity, summary)
                finally:
                    for lock in locks:
                        lock.release()
            except OSError as exc:  # a lock or a file could not be written (disk full, folder gone, ...)
                if not is_storage_full(exc):
                    raise
                log.error("stopping: %s is full (%s)", save_dir, exc.strerror)
                left = [j.name for b in batches[k:] for j in b if j.name not in summary.written]
                summary.failed += [(name, f"not written: the disk is full ({exc.strerror})") for name in left]
                return
            bar.update(len(batch))
    finally:
        bar.close()


def _generate_batch(
    cfg: InferenceConfig,
    m: Models,
    save_dir: Path,
    jobs: list[VideoJob],
    identity: VideoIdentity,
    summary: RunSummary,
) -> None:
    try:
        g = generate(m, cfg, jobs, progress=not cfg.quiet)
    except Exception as exc:  # noqa: BLE001 - one batch (e.g. out of memory) must not end a long job
        if m.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(jobs) > 1 and m.ctx.group_size == 1:
            # A video does not depend on its batch, so each alone gives the same result: one bad prompt (or a
            # batch too large for memory) must not take the others down. (Under SP the ranks would have to
            # agree on the retry; there the batch fails as a whole.)
            log.warning(
                "batch %s failed (%s: %s); generating its videos one at a time",
                [j.name for j in jobs],
                type(exc).__name__,
                exc,
            )
            for job in jobs:
                _generate_batch(cfg, m, save_dir, [job], identity, summary)
            return
        log.exception("batch %s failed", [j.name for j in jobs])
        summary.failed += [(j.name, f"{type(exc).__name__}: {exc}") for j in jobs]
        return
    if not m.ctx.is_writer:  # the writer of this SP group writes and counts the videos
        return
    for i, job in enumerate(jobs):
        write_batch_video(cfg, m, save_dir, job, g, i, len(jobs), identity, summary)
