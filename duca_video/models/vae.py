"""Open-Sora 1.2 video VAE: a per-frame 2D VAE (diffusers ``AutoencoderKL``) followed by the causal temporal VAE.

Mirrors upstream ``VideoAutoencoderPipeline`` / ``OpenSoraVAE_V1_2``: pixels (B, 3, T, H, W) in [-1, 1] become
latents (B, 4, T', H / 8, W / 8) where every 17-frame chunk maps to 5 latent frames, normalised channel-wise with
fixed shift / scale.  State-dict names match upstream (``spatial_vae.module.*``, ``temporal_vae.*``, ``scale``,
``shift``) so the single HF checkpoint ``hpcai-tech/OpenSora-VAE-v1.2`` loads strictly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import check_state_dict, read_state_dict
from .vae_temporal import (
    TEMPORAL_VAE_SD_CONFIG,
    CausalConv3d,
    DiagonalGaussianDistribution,
    TemporalVAE,
    VAE_Temporal_SD,
    causal_time_padding,
    temporal_vae_sd,
)

if TYPE_CHECKING:  # diffusers takes seconds to import; only load it when a spatial VAE is actually built
    from diffusers import AutoencoderKL

__all__ = [
    "OPENSORA_VAE_SCALE",
    "OPENSORA_VAE_SHIFT",
    "SDXL_VAE_CONFIG",
    "SPATIAL_SCALING_FACTOR",
    "TEMPORAL_VAE_SD_CONFIG",
    "CausalConv3d",
    "DiagonalGaussianDistribution",
    "OpenSoraVAE",
    "SpatialVAE",
    "TemporalVAE",
    "VAE_Temporal_SD",
    "causal_time_padding",
    "temporal_vae_sd",
]

# Upstream hard-codes SD-1.5's factor even though the SDXL VAE's config says 0.13025; the temporal VAE was
# trained on latents scaled this way, so it must stay (see hpcaitech/Open-Sora#493).
SPATIAL_SCALING_FACTOR = 0.18215
OPENSORA_VAE_SHIFT = (-0.10, 0.34, 0.27, 0.98)
OPENSORA_VAE_SCALE = (3.85, 2.32, 2.33, 3.06)

# Config of PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers (subfolder "vae"), the 2D VAE used by Open-Sora 1.2.
SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}

# Attention parameter names used by checkpoints saved with old diffusers versions.
_LEGACY_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _check_video(t: torch.Tensor, channels: int, what: str) -> None:
    if t.ndim != 5 or t.shape[1] != channels:
        raise ValueError(f"{what} must have shape (B, {channels}, T, H, W); got {tuple(t.shape)}")


def _strict_load(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, optional: Sequence[str] = ()):
    """Strict load with one error listing every problem; ``assign=True`` lets a module built on the meta device
    take the checkpoint tensors without a copy. Keys in ``optional`` may be absent (current values kept)."""
    check_state_dict(module, state_dict, source=what, optional=optional)
    expected = module.state_dict()
    module.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False, assign=True)
    still_meta = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"{what}: tensors left uninitialised after loading: {still_meta}")


def _full_spatial_config(config: Mapping[str, Any]) -> dict[str, Any]:
    cfg = dict(config)
    n = len(cfg.get("block_out_channels", (64,)))
    # Let tiny test configs omit the block types: diffusers needs one per resolution level.
    cfg.setdefault("down_block_types", ("DownEncoderBlock2D",) * n)
    cfg.setdefault("up_block_types", ("UpDecoderBlock2D",) * n)
    return cfg


class SpatialVAE(nn.Module):
    """Per-frame 2D VAE (upstream ``VideoAutoencoderKL``), micro-batched over frames to bound memory."""

    def __init__(
        self, module: AutoencoderKL, micro_batch_size: int | None = 4, scaling_factor: float = SPATIAL_SCALING_FACTOR
    ) -> None:
        super().__init__()
        self.module = module  # attribute name fixes the ``spatial_vae.module.*`` checkpoint prefix
        self.micro_batch_size = micro_batch_size
        self.scaling_factor = scaling_factor
        self.in_channels = int(module.config.in_channels)
        self.out_channels = int(module.config.latent_channels)
        # Each extra resolution level halves H and W (8x for the 4-level SDXL VAE; upstream hard-codes 8).
        factor = 2 ** (len(module.config.block_out_channels) - 1)
        self.patch_size = (1, factor, factor)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] = SDXL_VAE_CONFIG, micro_batch_size: int | None = 4) -> SpatialVAE:
        from diffusers import AutoencoderKL

        return cls(AutoencoderKL(**_full_spatial_config(config)), micro_batch_size)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        subfolder: str | None = "vae",
        micro_batch_size: int | None = 4,
        dtype: torch.dtype | None = None,
    ) -> SpatialVAE:
        """Load a diffusers ``AutoencoderKL`` from a local directory (never touches the network)."""
        from diffusers import AutoencoderKL

        module = AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, local_files_only=True, torch_dtype=dtype)
        return cls(module, micro_batch_size)

    def _frames(self, x: torch.Tensor, fn) -> torch.Tensor:
        b, _, t = x.shape[:3]
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, *x.shape[1:2], *x.shape[3:])
        step = self.micro_batch_size or frames.shape[0]
        out = torch.cat([fn(frames[i : i + step]) for i in range(0, frames.shape[0], step)], dim=0)
        return out.reshape(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, T, H, W) pixels -> (B, 4, T, H/f, W/f) sampled latents times 0.18215."""
        _check_video(x, self.in_channels, "x")
        return self._frames(x, lambda f: self.module.encode(f).latent_dist.sample(generator) * self.scaling_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        _check_video(z, self.out_channels, "z")
        return self._frames(z, lambda f: self.module.decode(f / self.scaling_factor).sample)

    def get_latent_size(self, input_size: Sequence[int | None]) -> tuple[int | None, ...]:
        return tuple(None if s is None else s // p for s, p in zip(input_size[:3], self.patch_size))


class OpenSoraVAE(nn.Module):
    """Spatial VAE + temporal VAE + latent normalisation (upstream ``VideoAutoencoderPipeline``, inference path)."""

    def __init__(
        self,
        spatial_vae: SpatialVAE | AutoencoderKL,
        temporal_vae: TemporalVAE,
        micro_frame_size: int | None = 17,
        shift: float | Sequence[float] = OPENSORA_VAE_SHIFT,
        scale: float | Sequence[float] = OPENSORA_VAE_SCALE,
        micro_batch_size: int | None = 4,
    ) -> None:
        super().__init__()
        if not isinstance(spatial_vae, SpatialVAE):
            spatial_vae = SpatialVAE(spatial_vae, micro_batch_size)
        if spatial_vae.out_channels != temporal_vae.in_out_channels:
            raise ValueError(
                f"spatial VAE latent channels ({spatial_vae.out_channels}) != temporal VAE in_out_channels "
                f"({temporal_vae.in_out_channels})"
            )
        self.spatial_vae = spatial_vae
        self.temporal_vae = temporal_vae
        self.micro_frame_size = micro_frame_size
        self.micro_z_frame_size = (
            None if micro_frame_size is None else temporal_vae.get_latent_size((micro_frame_size, None, None))[0]
        )
        self.out_channels = temporal_vae.embed_dim
        # Built outside any meta-device context by callers, so they are real even for meta-built submodules.
        # Per-channel values broadcast over (B, C, T, H, W), the same buffer shape upstream saves.
        scale_t = torch.tensor(scale, dtype=torch.float32, device="cpu")
        shift_t = torch.tensor(shift, dtype=torch.float32, device="cpu")
        self.register_buffer("scale", scale_t.view(1, -1, 1, 1, 1) if scale_t.ndim else scale_t)
        self.register_buffer("shift", shift_t.view(1, -1, 1, 1, 1) if shift_t.ndim else shift_t)

    # ------------------------------------------------------------------ construction / loading
    @classmethod
    def from_config(
        cls,
        spatial_config: Mapping[str, Any] | None = None,
        temporal_config: Mapping[str, Any] | None = None,
        *,
        micro_batch_size: int | None = 4,
        micro_frame_size: int | None = 17,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> OpenSoraVAE:
        """Randomly initialised pipeline; defaults are the full Open-Sora 1.2 sizes."""
        spatial = SpatialVAE.from_config(spatial_config or SDXL_VAE_CONFIG, micro_batch_size)
        temporal = TemporalVAE(**(temporal_config or TEMPORAL_VAE_SD_CONFIG))
        return cls(spatial, temporal, micro_frame_size).to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        spatial_vae_path: str | os.PathLike,
        temporal_vae_weights: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        subfolder: str | None = "vae",
        temporal_config: Mapping[str, Any] | None = None,
        micro_batch_size: int | None = 4,
        micro_frame_size: int | None = 17,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> OpenSoraVAE:
        """Spatial VAE from a local diffusers directory + temporal VAE from a state dict (or a file holding one)."""
        spatial = SpatialVAE.from_pretrained(spatial_vae_path, subfolder, micro_batch_size)
        sd = (
            temporal_vae_weights if isinstance(temporal_vae_weights, Mapping) else read_state_dict(temporal_vae_weights)
        )
        # Accept a temporal state dict cut out of a combined checkpoint as well as a bare one.
        if sd and all(k.startswith("temporal_vae.") for k in sd):
            sd = {k[len("temporal_vae.") :]: v for k, v in sd.items()}
        with torch.device("meta"):
            temporal = TemporalVAE(**(temporal_config or TEMPORAL_VAE_SD_CONFIG))
        _strict_load(temporal, sd, "temporal VAE")
        return cls(spatial, temporal, micro_frame_size).to(device=device, dtype=dtype)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        spatial_config: Mapping[str, Any] | None = None,
        temporal_config: Mapping[str, Any] | None = None,
        micro_batch_size: int | None = 4,
        micro_frame_size: int | None = 17,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> OpenSoraVAE:
        """Whole pipeline from one combined state dict (e.g. hpcai-tech/OpenSora-VAE-v1.2 ``model.safetensors``)."""
        from diffusers import AutoencoderKL

        sd = checkpoint if isinstance(checkpoint, Mapping) else read_state_dict(checkpoint)
        # Building on meta skips ~400M parameters of random init that the checkpoint overwrites anyway.
        with torch.device("meta"):
            spatial = SpatialVAE(
                AutoencoderKL(**_full_spatial_config(spatial_config or SDXL_VAE_CONFIG)), micro_batch_size
            )
            temporal = TemporalVAE(**(temporal_config or TEMPORAL_VAE_SD_CONFIG))
        model = cls(spatial, temporal, micro_frame_size)
        model.load_combined_state_dict(sd)
        return model.to(device=device, dtype=dtype)

    def load_combined_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Strictly load ``spatial_vae.module.*`` + ``temporal_vae.*`` (+ optional ``scale`` / ``shift``) weights.

        Raises ValueError listing every missing, unexpected and mis-shaped key.
        """
        renamed: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith("spatial_vae.module.") and "attention" in key:
                for old, new in _LEGACY_ATTENTION_NAMES.items():
                    key = key.replace(old, new)
            renamed[key] = value
        # Upstream saves scale / shift as buffers; a checkpoint without them falls back to the published constants.
        _strict_load(self, renamed, "OpenSoraVAE", optional=("scale", "shift"))

    # ------------------------------------------------------------------ inference
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def get_latent_size(self, input_size: Sequence[int | None]) -> tuple[int | None, ...]:
        """Latent (T, H, W) for pixel (T, H, W); every full ``micro_frame_size`` chunk is encoded on its own."""
        spatial = self.spatial_vae.get_latent_size(input_size)
        if self.micro_frame_size is None or input_size[0] is None:
            return self.temporal_vae.get_latent_size(spatial)
        full, rest = divmod(input_size[0], self.micro_frame_size)
        t = full * self.micro_z_frame_size
        if rest:
            t += self.temporal_vae.get_latent_size((rest, None, None))[0]
        return (t, *spatial[1:])

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> normalised latent (B, 4, *get_latent_size((T, H, W)))."""
        _check_video(x, self.spatial_vae.in_channels, "x")
        x_z = self.spatial_vae.encode(x, generator)
        step = self.micro_frame_size or x_z.shape[2]
        # Chunks are encoded independently (causal padding restarts per chunk), as the model was trained.
        z = torch.cat(
            [self.temporal_vae.encode(x_z[:, :, i : i + step]).sample(generator) for i in range(0, x_z.shape[2], step)],
            dim=2,
        )
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latent (B, 4, t, h, w) -> pixels (B, 3, num_frames, h*f, w*f), roughly in [-1, 1]."""
        _check_video(z, self.temporal_vae.embed_dim, "z")
        expected = self.get_latent_size((num_frames, None, None))[0]
        if num_frames <= 0 or expected != z.shape[2]:
            raise ValueError(f"num_frames={num_frames} needs {expected} latent frames, but z has {z.shape[2]}")
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        if self.micro_frame_size is None:
            x_z = self.temporal_vae.decode(z, num_frames=num_frames)
        else:
            chunks = []
            remaining = num_frames
            for i in range(0, z.shape[2], self.micro_z_frame_size):
                # Every chunk but the last holds micro_frame_size frames; the decoder crops its causal padding.
                n = min(self.micro_frame_size, remaining)
                chunks.append(self.temporal_vae.decode(z[:, :, i : i + self.micro_z_frame_size], num_frames=n))
                remaining -= self.micro_frame_size
            x_z = torch.cat(chunks, dim=2)
        return self.spatial_vae.decode(x_z)
