"""Causal 3D temporal VAE of Open-Sora 1.2 (weight-compatible with upstream ``VAE_Temporal``).

The temporal VAE runs on top of the latents of a 2D (per-frame) VAE and compresses time by
``2 ** sum(temporal_downsample)`` (4 for the released model).  All convolutions are causal in time:
they only pad at the front, so frame ``t`` of the output never sees input frames after ``t``.

Parameter names mirror upstream exactly so its checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TEMPORAL_VAE_SD_CONFIG",
    "CausalConv3d",
    "DiagonalGaussianDistribution",
    "TemporalVAE",
    "VAE_Temporal_SD",
    "causal_time_padding",
    "temporal_vae_sd",
]

# The configuration of the released Open-Sora 1.2 temporal VAE (upstream ``VAE_Temporal_SD``).
TEMPORAL_VAE_SD_CONFIG: dict = {
    "in_out_channels": 4,
    "latent_embed_dim": 4,
    "embed_dim": 4,
    "filters": 128,
    "num_res_blocks": 4,
    "channel_multipliers": (1, 2, 2, 4),
    "temporal_downsample": (False, True, True),
}


def causal_time_padding(num_frames: int, factor: int) -> int:
    """Frames prepended so that ``num_frames`` becomes a multiple of ``factor`` (0 when it already is)."""
    return (-num_frames) % factor


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(value)
    if len(value) != 3:
        raise ValueError(f"expected an int or 3 values, got {value!r}")
    return value  # type: ignore[return-value]


def _activation(name: str) -> type[nn.Module]:
    if name == "swish":
        return nn.SiLU
    if name == "relu":
        return nn.ReLU
    raise NotImplementedError(f"unsupported activation_fn {name!r} (expected 'swish' or 'relu')")


class CausalConv3d(nn.Module):
    """3D convolution that pads time only at the front and space symmetrically ("same" spatially)."""

    def __init__(
        self,
        chan_in: int,
        chan_out: int,
        kernel_size: int | Sequence[int],
        pad_mode: str = "constant",
        strides: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"spatial kernel sizes must be odd, got {(kh, kw)}")
        dilation = kwargs.pop("dilation", 1)
        t_stride = strides[0] if strides is not None else kwargs.pop("stride", 1)
        # A strided causal conv pads one frame less per extra stride step so that T frames map to
        # ceil(T / stride) outputs, matching upstream's shape arithmetic.
        self.time_pad = dilation * (kt - 1) + (1 - t_stride)
        self.pad_mode = pad_mode
        # F.pad order: (w_left, w_right, h_top, h_bottom, t_front, t_back).
        self.time_causal_padding = (kw // 2, kw // 2, kh // 2, kh // 2, self.time_pad, 0)
        stride = tuple(strides) if strides is not None else (t_stride, 1, 1)
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), stride=stride, dilation=(dilation, 1, 1), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.time_causal_padding, mode=self.pad_mode))


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm -> act -> conv, twice) with a 1x1x1 projection on width change."""

    def __init__(
        self,
        in_channels: int,
        filters: int,
        num_groups: int = 32,
        activation_fn: type[nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.filters = filters
        self.activate = activation_fn()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, filters, (3, 3, 3), bias=False)
        self.norm2 = nn.GroupNorm(num_groups, filters)
        self.conv2 = CausalConv3d(filters, filters, (3, 3, 3), bias=False)
        if in_channels != filters:
            self.conv3 = CausalConv3d(in_channels, filters, (1, 1, 1), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.activate(self.norm1(x)))
        h = self.conv2(self.activate(self.norm2(h)))
        shortcut = self.conv3(x) if self.in_channels != self.filters else x
        return h + shortcut


def _res_stack(in_channels: int, filters: int, count: int, num_groups: int, act: type[nn.Module]) -> nn.ModuleList:
    blocks = nn.ModuleList()
    for _ in range(count):
        blocks.append(ResBlock(in_channels, filters, num_groups, act))
        in_channels = filters
    return blocks


class Encoder(nn.Module):
    def __init__(
        self,
        in_out_channels: int = 4,
        latent_embed_dim: int = 512,
        filters: int = 128,
        num_res_blocks: int = 4,
        channel_multipliers: Sequence[int] = (1, 2, 2, 4),
        temporal_downsample: Sequence[bool] = (False, True, True),
        num_groups: int = 32,
        activation_fn: str = "swish",
    ) -> None:
        super().__init__()
        act = _activation(activation_fn)
        self.num_blocks = len(channel_multipliers)
        self.activate = act()
        self.conv_in = CausalConv3d(in_out_channels, filters, (3, 3, 3), bias=False)

        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = filters
        width = filters
        for i, mult in enumerate(channel_multipliers):
            width = filters * mult
            self.block_res_blocks.append(_res_stack(prev, width, num_res_blocks, num_groups, act))
            prev = width
            if i < self.num_blocks - 1:
                # Only time is downsampled here: space was already compressed by the 2D VAE.  An Identity
                # keeps the list indices (and hence checkpoint names) aligned with upstream.
                if temporal_downsample[i]:
                    self.conv_blocks.append(CausalConv3d(prev, width, (3, 3, 3), strides=(2, 1, 1)))
                else:
                    self.conv_blocks.append(nn.Identity())

        self.res_blocks = _res_stack(prev, width, num_res_blocks, num_groups, act)
        self.norm1 = nn.GroupNorm(num_groups, width)
        # Upstream passes padding="same" here; with a 1x1x1 kernel that is a no-op, so it is omitted.
        self.conv2 = CausalConv3d(width, latent_embed_dim, (1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, stack in enumerate(self.block_res_blocks):
            for block in stack:
                x = block(x)
            if i < self.num_blocks - 1:
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(self.activate(self.norm1(x)))


class Decoder(nn.Module):
    def __init__(
        self,
        in_out_channels: int = 4,
        latent_embed_dim: int = 512,
        filters: int = 128,
        num_res_blocks: int = 4,
        channel_multipliers: Sequence[int] = (1, 2, 2, 4),
        temporal_downsample: Sequence[bool] = (False, True, True),
        num_groups: int = 32,
        activation_fn: str = "swish",
    ) -> None:
        super().__init__()
        act = _activation(activation_fn)
        self.num_blocks = len(channel_multipliers)
        self.temporal_downsample = tuple(bool(t) for t in temporal_downsample)
        self.activate = act()

        width = filters * channel_multipliers[-1]
        self.conv1 = CausalConv3d(latent_embed_dim, width, (3, 3, 3), bias=True)
        self.res_blocks = _res_stack(width, width, num_res_blocks, num_groups, act)

        # Built deepest-first (to track in_channels) but stored shallowest-first, like upstream, so that
        # block_res_blocks[i] / conv_blocks[i - 1] mirror the encoder's indexing.
        stacks: list[nn.ModuleList] = []
        ups: list[nn.Module] = []
        prev = width
        for i in reversed(range(self.num_blocks)):
            width = filters * channel_multipliers[i]
            stacks.insert(0, _res_stack(prev, width, num_res_blocks, num_groups, act))
            prev = width
            if i > 0:
                if self.temporal_downsample[i - 1]:
                    # Produces 2x channels that are then unfolded into 2x frames (depth-to-time).
                    ups.insert(0, CausalConv3d(prev, prev * 2, (3, 3, 3)))
                else:
                    ups.insert(0, nn.Identity())
        self.block_res_blocks = nn.ModuleList(stacks)
        self.conv_blocks = nn.ModuleList(ups)
        self.norm1 = nn.GroupNorm(num_groups, prev)
        self.conv_out = CausalConv3d(width, in_out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(self.num_blocks)):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                if self.temporal_downsample[i - 1]:
                    # Channel layout is (C, ts) with C outer, i.e. "B (C ts) T H W -> B C (T ts) H W".
                    b, c2, t, h, w = x.shape
                    x = x.reshape(b, c2 // 2, 2, t, h, w).transpose(2, 3).reshape(b, c2 // 2, t * 2, h, w)
        return self.conv_out(self.activate(self.norm1(x)))


class DiagonalGaussianDistribution:
    """Posterior of the temporal VAE: moments are split into mean / log-variance along channels."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(mean)
            self.var = torch.zeros_like(mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Upstream draws float32 noise on the CPU and then moves it; doing the same keeps seeded runs
        # reproducible against upstream.  A generator on another device draws there instead.
        noise_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to a standard normal, summed over (C, T, H, W)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3, 4])


class TemporalVAE(nn.Module):
    """Open-Sora 1.2 ``VAE_Temporal``: (B, C, T, H, W) -> posterior over (B, embed_dim, ceil(T / 4), H, W)."""

    def __init__(
        self,
        in_out_channels: int = 4,
        latent_embed_dim: int = 4,
        embed_dim: int = 4,
        filters: int = 128,
        num_res_blocks: int = 4,
        channel_multipliers: Sequence[int] = (1, 2, 2, 4),
        temporal_downsample: Sequence[bool] = (True, True, False),
        num_groups: int = 32,
        activation_fn: str = "swish",
    ) -> None:
        super().__init__()
        channel_multipliers = tuple(channel_multipliers)
        temporal_downsample = tuple(bool(t) for t in temporal_downsample)
        if len(temporal_downsample) < len(channel_multipliers) - 1:
            raise ValueError("temporal_downsample needs one entry per resolution transition")
        self.in_out_channels = in_out_channels
        self.out_channels = in_out_channels
        self.embed_dim = embed_dim
        self.time_downsample_factor = 2 ** sum(temporal_downsample[: len(channel_multipliers) - 1])
        self.patch_size = (self.time_downsample_factor, 1, 1)
        blocks = dict(
            filters=filters,
            num_res_blocks=num_res_blocks,
            channel_multipliers=channel_multipliers,
            temporal_downsample=temporal_downsample,
            num_groups=num_groups,
            activation_fn=activation_fn,
        )
        # The encoder emits mean and log-variance stacked along channels, hence 2x.
        self.encoder = Encoder(in_out_channels=in_out_channels, latent_embed_dim=latent_embed_dim * 2, **blocks)
        self.quant_conv = CausalConv3d(2 * latent_embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = CausalConv3d(embed_dim, latent_embed_dim, 1)
        self.decoder = Decoder(in_out_channels=in_out_channels, latent_embed_dim=latent_embed_dim, **blocks)

    def get_latent_size(self, input_size: Sequence[int | None]) -> tuple[int | None, ...]:
        """Latent (T, H, W) for an input (T, H, W); ``None`` entries pass through."""
        out: list[int | None] = []
        for dim, size in enumerate(input_size[:3]):
            if size is None:
                out.append(None)
            elif dim == 0:
                out.append((size + causal_time_padding(size, self.time_downsample_factor)) // self.patch_size[0])
            else:
                out.append(size // self.patch_size[dim])
        return tuple(out)

    def _check_input(self, t: torch.Tensor, channels: int, what: str) -> None:
        if t.ndim != 5 or t.shape[1] != channels:
            raise ValueError(f"{what} must have shape (B, {channels}, T, H, W); got {tuple(t.shape)}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Encode (B, in_out_channels, T, H, W); T is front-padded with zeros up to a multiple of the factor."""
        self._check_input(x, self.in_out_channels, "x")
        pad = causal_time_padding(x.shape[2], self.time_downsample_factor)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, pad, 0))
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Decode (B, embed_dim, t, H, W) to ``num_frames`` frames by dropping the leading causal padding.

        ``num_frames=None`` returns all ``t * factor`` frames (upstream requires it explicitly).
        """
        self._check_input(z, self.embed_dim, "z")
        if num_frames is None:
            num_frames = z.shape[2] * self.time_downsample_factor
        expected = self.get_latent_size((num_frames, None, None))[0]
        if num_frames <= 0 or expected != z.shape[2]:
            raise ValueError(f"num_frames={num_frames} needs {expected} latent frames, but z has {z.shape[2]}")
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, causal_time_padding(num_frames, self.time_downsample_factor) :]

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution, torch.Tensor]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, num_frames=x.shape[2]), posterior, z


def temporal_vae_sd(**kwargs) -> TemporalVAE:
    """The full-size temporal VAE of Open-Sora 1.2 (upstream ``VAE_Temporal_SD``); kwargs override e.g. num_groups."""
    return TemporalVAE(**{**TEMPORAL_VAE_SD_CONFIG, **kwargs})


# Upstream registry name, kept so configs written against Open-Sora read naturally.
VAE_Temporal_SD = temporal_vae_sd
