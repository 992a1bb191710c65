"""Rectified-flow sampling for Open-Sora 1.2 (RFlow + classifier-free guidance + timestep transform).

Conventions (Open-Sora's): `x_t = (1 - t/T) x0 + (t/T) eps` with T = num_timesteps = 1000, t runs from T down
towards 0, and the model predicts the velocity `v = x0 - eps` so that `z += v * dt / T` with dt > 0 moves the
latent towards the data.  The sampler tells listeners registered on the model (see `events.py`) where it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from tqdm.auto import tqdm

from duca_video.models.attention import cut_text_keys
from duca_video.sampling.checks import check_sample_inputs
from duca_video.seeds import check_seed

from .events import SampleStart, SamplingListener, StepStart, listeners_of

__all__ = ["RFlowSampler", "add_noise", "describe", "timestep_transform"]

# The sampler owns these model arguments; a caller passing them in model_kwargs would be silently overridden.
_RESERVED_KWARGS = ("y", "mask", "x_mask")
Number = Union[int, float]


def _as_f32(value: Number | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    # Upstream builds height/width in the model dtype; in fp16 480*854 overflows and in bf16 854 becomes 856.
    # Doing the arithmetic in float32 (the reference lists were made that way) avoids both.
    return torch.as_tensor(value, device=device).to(torch.float32)


def timestep_transform(
    t: Number | torch.Tensor,
    height: Number | torch.Tensor,
    width: Number | torch.Tensor,
    num_frames: Number | torch.Tensor,
    base_resolution: int = 512 * 512,
    scale: float = 1.0,
    num_timesteps: int = 1000,
) -> float | torch.Tensor:
    """Shift timesteps towards the noisy end for large videos: `t' = r t / (1 + (r - 1) t)` on t/num_timesteps.

    `r = sqrt(H*W / base_resolution) * sqrt(num_frames // 17 * 5) * scale` (the time factor is 1 for images).
    The operations mirror upstream's in float32, so the results equal upstream's fp32 lists bit for bit.
    Returns a float when every input is a Python number, else a float32 tensor (broadcast over the inputs).
    """
    scalar_in = not any(isinstance(v, torch.Tensor) for v in (t, height, width, num_frames))
    device = next((v.device for v in (t, height, width, num_frames) if isinstance(v, torch.Tensor)), None)
    tt = _as_f32(t, device) / num_timesteps
    resolution = _as_f32(height, device) * _as_f32(width, device)
    ratio_space = (resolution / base_resolution).sqrt()
    nf = _as_f32(num_frames, device)
    # num_frames // 17 * 5 is the latent frame count of the 17-frame-chunked temporal VAE.
    latent_frames = torch.where(nf == 1, torch.ones_like(nf), torch.div(nf, 17, rounding_mode="floor") * 5)
    if bool((latent_frames <= 0).any()):
        raise ValueError(
            f"timestep_transform: num_frames={nf.tolist()} gives a zero time ratio (num_frames // 17 * 5 == 0); "
            "upstream would produce NaN timesteps. Use num_frames == 1 or >= 17, or disable the transform."
        )
    ratio = ratio_space * latent_frames.sqrt() * scale
    new_t = ratio * tt / (1 + (ratio - 1) * tt) * num_timesteps
    if scalar_in:
        return float(new_t.item())
    return new_t


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: Number | torch.Tensor, num_timesteps: int = 1000
) -> torch.Tensor:
    """`x_t = (1 - t/T) x0 + (t/T) noise`; t is a number or a (B,) tensor (one timestep per sample)."""
    if x0.shape != noise.shape:
        raise ValueError(f"add_noise: x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    tp = torch.as_tensor(t, device=x0.device).float() / num_timesteps
    if tp.dim() == 1:
        if tp.shape[0] != x0.shape[0]:
            raise ValueError(f"add_noise: {tp.shape[0]} timesteps for a batch of {x0.shape[0]}")
        tp = tp.view(-1, *([1] * (x0.dim() - 1)))
    elif tp.dim() != 0:
        raise ValueError(f"add_noise: t must be a number or a (B,) tensor, got shape {tuple(tp.shape)}")
    keep = 1 - tp
    return keep * x0 + (1 - keep) * noise


def _uniform_scalar(model_kwargs: Mapping[str, Any], key: str) -> float:
    if key not in model_kwargs or model_kwargs[key] is None:
        raise ValueError(f"model_kwargs['{key}'] is required for the timestep transform")
    value = torch.as_tensor(model_kwargs[key]).float().flatten()
    if value.numel() == 0 or not bool((value == value[0]).all()):
        raise ValueError(f"model_kwargs['{key}'] must hold one value for the whole batch, got {value.tolist()}")
    return float(value[0].item())


def _end_all(listeners: list[SamplingListener]) -> BaseException | None:
    # Every listener must get its end even when another one fails, or it keeps a stale per-sample state.
    first: BaseException | None = None
    for listener in listeners:
        try:
            listener.on_sample_end()
        except Exception as exc:  # noqa: BLE001 - reported after all listeners have been told
            first = first or exc
    return first


@dataclass
class _Run:
    """What every step of one sample uses: the model, its text batch and keyword arguments, the guidance."""

    model: torch.nn.Module
    y: torch.Tensor
    mask: torch.Tensor | None
    kwargs: Mapping[str, Any]
    cfg: bool
    scale: float
    batch: int
    channels: int
    frame_mask: torch.Tensor | None = None  # (B, T) float32 on the device, for reference frames
    draw_noise: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class RFlowSampler:
    """Open-Sora 1.2's RFLOW scheduler (defaults are its 1.2 inference config: 30 steps, CFG 7, transform on)."""

    num_sampling_steps: int = 30
    num_timesteps: int = 1000
    cfg_scale: float = 7.0
    use_timestep_transform: bool = True
    transform_scale: float = 1.0
    use_discrete_timesteps: bool = False
    # Set by each `sample`: the caption keys cross-attention attended to after the cut (not a setting, so not a
    # dataclass field: records and replays of the sampler's settings leave it out).
    last_text_tokens = None

    def __post_init__(self) -> None:
        if self.num_sampling_steps < 1:
            raise ValueError(f"num_sampling_steps must be >= 1, got {self.num_sampling_steps}")
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")

    def timesteps(self, height: Number, width: Number, num_frames: Number) -> list[float]:
        """The sampling timesteps, noisiest first; values are float32 numbers in (0, num_timesteps]."""
        n, total = self.num_sampling_steps, self.num_timesteps
        ts: list[float] = [(1.0 - i / n) * total for i in range(n)]
        if self.use_discrete_timesteps:
            ts = [float(int(round(t))) for t in ts]
        base = torch.tensor(ts, dtype=torch.float32)
        if self.use_timestep_transform:
            # Upstream's sampler does not pass transform_scale (only training does); with the default 1.0
            # both agree, and honouring a user's non-default value is the less surprising choice.
            base = timestep_transform(base, height, width, num_frames, scale=self.transform_scale, num_timesteps=total)
        return [float(v) for v in base.tolist()]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        model: torch.nn.Module,
        z: torch.Tensor,
        y: torch.Tensor,
        y_null: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        *,
        model_kwargs: Mapping[str, Any],
        frame_mask: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        progress: bool = True,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoise `z` (B, C, T, H, W) from t = num_timesteps to 0; returns the final latent (float32 or wider).

        y / y_null: (B, 1, L, C_text) caption and null-caption embeddings; mask: (B, L) valid caption tokens,
        on the CPU (read for free) or on the device (read once per sample): the model gets the text cut to the
        batch's longest caption, and no mask when every caption has that length.
        As upstream, the null half of the CFG batch uses the *same* token mask as its prompt, so the null
        caption is cut to each prompt's length. frame_mask: (B, T) in [0, 1], 1 = generate, 0 = keep the input
        frame (a reference), in between = keep it until t falls to frame_mask * num_timesteps, then noise it.
        seed: the run's seed, or one seed per video (B of them): each video then draws its token selection
        (announced to the cache) and its reference-frame noise from its own seed, so it does not depend on the
        batch it is in. The reference-frame noise comes from `generator` when given.
        """
        scale = float(self.cfg_scale if guidance_scale is None else guidance_scale)
        cfg = scale != 1.0  # with scale 1 the null half cancels out exactly, so it is not computed
        check_sample_inputs(z, y, y_null, mask, frame_mask, model_kwargs, cfg, _RESERVED_KWARGS)
        ts_list = self._sample_timesteps(model_kwargs)
        seeds = _video_seeds(seed, z.shape[0])
        y_in, mask_in = self._text_batch(y, y_null, mask, cfg)
        run = _Run(model, y_in, mask_in, model_kwargs, cfg, scale, z.shape[0], z.shape[1])
        if frame_mask is not None:
            run.draw_noise = _noise_source(generator, seed, seeds, z.device)
            run.frame_mask = frame_mask.to(device=z.device, dtype=torch.float32)
        listeners = listeners_of(model)
        try:
            start = SampleStart(len(ts_list), tuple(ts_list), run.batch, cfg, seeds[0] if seeds else seed, seeds)
            for listener in listeners:
                listener.on_sample_start(start)
            # Upstream's model returns fp32, which promotes a bf16/fp16 latent to fp32 after the first step;
            # promoting up front gives the same numbers and a dtype that does not change mid-loop.
            z = self._loop(z.to(torch.promote_types(z.dtype, torch.float32)), ts_list, run, listeners, progress)
        except BaseException:
            _end_all(listeners)
            raise
        err = _end_all(listeners)
        if err is not None:
            raise err
        return z

    def _loop(self, z: torch.Tensor, ts_list: list[float], run: _Run, listeners: list, progress: bool) -> torch.Tensor:
        """The denoising steps, each announced to the listeners before the model runs."""
        ts = torch.tensor(ts_list, dtype=torch.float32, device=z.device)
        num_steps = len(ts_list)
        if run.frame_mask is not None:
            mask_t = run.frame_mask * self.num_timesteps
            noise_added = run.frame_mask == 1  # frames to generate start as pure noise already
        for i in tqdm(range(num_steps), total=num_steps, desc="rflow", disable=None if progress else True):
            t = ts[i]
            x_mask = None
            if run.frame_mask is not None:
                z, x0, upper = self._noise_kept_frames(z, t, mask_t, noise_added, run.draw_noise)
                noise_added = upper
                x_mask = upper.repeat(2, 1) if run.cfg else upper
            for listener in listeners:
                listener.on_step_start(StepStart(i, num_steps, ts_list[i]))
            v = self._prediction(run, torch.cat([z, z], 0) if run.cfg else z, t, x_mask)
            # The last step integrates all the way to t = 0 (dt = t_last), as upstream.
            dt = (ts[i] - ts[i + 1] if i < num_steps - 1 else ts[i]) / self.num_timesteps
            z = z + v.to(z.dtype) * dt
            if run.frame_mask is not None:
                z = torch.where(upper[:, None, :, None, None], z, x0)
        return z

    def _prediction(self, run: _Run, z_in: torch.Tensor, t: torch.Tensor, x_mask: torch.Tensor | None) -> torch.Tensor:
        """The guided velocity of one step: the model on the batch ([cond; uncond] with CFG)."""
        t_in = t.expand(z_in.shape[0]).contiguous()
        out = run.model(z_in, t_in, y=run.y, mask=run.mask, x_mask=x_mask, **run.kwargs)
        return self._velocity(out, z_in.shape, run.channels, run.cfg, run.scale)

    def _noise_kept_frames(self, z, t, mask_t, noise_added, draw_noise) -> tuple[torch.Tensor, ...]:
        """Frames whose mask value t has now passed get noised to t (once); returns (z, x0, frames now noisy)."""
        x0 = z.clone()
        # Drawn every step (as upstream's randn_like) so the random stream does not depend on the mask.
        noise = draw_noise(z)
        upper = mask_t >= t
        fresh = upper & ~noise_added
        z = torch.where(fresh[:, None, :, None, None], add_noise(x0, noise, t, self.num_timesteps), x0)
        return z, x0, upper

    def _sample_timesteps(self, model_kwargs: Mapping[str, Any]) -> list[float]:
        if not self.use_timestep_transform:
            return self.timesteps(0, 0, 1)
        return self.timesteps(*[_uniform_scalar(model_kwargs, k) for k in ("height", "width", "num_frames")])

    def _text_batch(self, y, y_null, mask, cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The captions (and mask) of the model batch: [y, null] with CFG, cut to the keys any row attends to."""
        if cfg:
            assert y_null is not None
            y_in = torch.cat([y, y_null.to(device=y.device, dtype=y.dtype).expand_as(y)], 0)
            # STDiT3.encode_text repeats a (B, L) mask over a 2B batch: pass it doubled so any model agrees.
            mask_in = None if mask is None else mask.repeat(2, 1)
        else:
            y_in, mask_in = y, mask
        # Once per sample, the loop's only read of the mask: cut the text keys no row attends to (the null half
        # shares its prompt's mask, so the batch's longest prompt decides), and drop the mask when all rows agree.
        # A CPU mask (the tokenizer's) costs no device read at all; what is left of it goes to the device once.
        y_in, mask_in = cut_text_keys(y_in, mask_in)
        self.last_text_tokens = y_in.shape[-2]  # what cross-attention attends to (FLOP replays count that)
        if mask_in is not None:
            mask_in = mask_in.to(y_in.device, non_blocking=True)
        return y_in, mask_in

    @staticmethod
    def _velocity(out: torch.Tensor, in_shape: torch.Size, channels: int, cfg: bool, scale: float) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.dim() != 5:
            raise ValueError(f"model must return a (B, C, T, H, W) tensor, got {getattr(out, 'shape', type(out))}")
        if out.shape[0] != in_shape[0] or out.shape[2:] != in_shape[2:] or out.shape[1] < channels:
            raise ValueError(f"model output {tuple(out.shape)} does not fit its input {tuple(in_shape)}")
        pred = out[:, :channels]  # pred_sigma models return 2C channels; the velocity is the first C
        if not cfg:
            return pred
        cond, uncond = pred.chunk(2, dim=0)
        return uncond + scale * (cond - uncond)

    # ------------------------------------------------------------------ training
    def training_loss(
        self,
        model: torch.nn.Module,
        x0: torch.Tensor,
        model_kwargs: Mapping[str, Any],
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        sample_method: str = "logit-normal",
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """RFlow v-MSE: the model sees `x_t = add_noise(x0, eps, t)` and should predict `x0 - eps` (upstream's sign).

        t, when not given, is drawn per sample (logit-normal(0, 1) or uniform on [0, T)), then transformed like
        upstream when `use_timestep_transform` (needs height/width/num_frames in model_kwargs). model_kwargs are
        passed to the model as is (y, mask, fps, ...). reduction "mean" gives a scalar, "none" the (B,) losses.
        """
        if sample_method not in ("logit-normal", "uniform"):
            raise ValueError(f"sample_method must be 'logit-normal' or 'uniform', got {sample_method!r}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        batch, dev = x0.shape[0], x0.device
        if t is None:
            if self.use_discrete_timesteps:
                t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=dev).float()
            elif sample_method == "uniform":
                t = torch.rand(batch, generator=generator, device=dev) * self.num_timesteps
            else:  # LogisticNormal(0, 1) on a 1-simplex is sigmoid of a standard normal
                t = torch.sigmoid(torch.randn(batch, generator=generator, device=dev)) * self.num_timesteps
            if self.use_timestep_transform:
                t = timestep_transform(
                    t,
                    model_kwargs["height"],
                    model_kwargs["width"],
                    model_kwargs["num_frames"],
                    scale=self.transform_scale,
                    num_timesteps=self.num_timesteps,
                )
        t = torch.as_tensor(t, device=dev, dtype=torch.float32).expand(batch)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        x_t = add_noise(x0, noise, t, self.num_timesteps).to(x0.dtype)
        out = model(x_t, t, **model_kwargs)
        v = out[:, : x0.shape[1]]
        per_sample = (v.float() - (x0 - noise).float()).pow(2).flatten(1).mean(1)
        return per_sample.mean() if reduction == "mean" else per_sample


def describe(sampler: RFlowSampler) -> dict[str, Any]:
    """The sampler's settings as plain data, for run records."""
    return {k: getattr(sampler, k) for k in sampler.__dataclass_fields__}


def _video_seeds(seed: int | Sequence[int] | None, batch: int) -> tuple[int, ...] | None:
    """Per-video seeds as a tuple (None for a single run seed)."""
    seed = check_seed(seed, "sample")
    if seed is None or isinstance(seed, int):
        return None
    seeds = tuple(seed)
    if len(seeds) != batch:
        raise ValueError(f"sample: {len(seeds)} seeds for a batch of {batch} videos (pass one per video)")
    return seeds


def _noise_source(
    generator: torch.Generator | None,
    seed: int | Sequence[int] | None,
    seeds: tuple[int, ...] | None,
    device: torch.device,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Draws the reference-frame noise like `z`: from `generator`, else one generator per video seed (so a video's
    noise does not depend on its batch), else one generator seeded with the run seed."""
    if generator is None and seeds is not None:
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        return lambda z: torch.stack(
            [torch.randn(z.shape[1:], generator=g, device=z.device, dtype=z.dtype) for g in gens]
        )
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))  # type: ignore[arg-type]
    return lambda z: torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
