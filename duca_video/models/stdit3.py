"""STDiT3 (Open-Sora 1.2), weight-compatible with the official checkpoints.

Read top to bottom: the block (spatial or temporal), the model (embed -> blocks -> final layer); the config and
its checks are in `stdit3_config.py`.
The helpers `block_modulation`, `modulate_tokens`, `gate_tokens` and `block_self_attention` are the block's
math written against Open-Sora's attribute names only (`attn`, `cross_attn`, `mlp`, `norm1`, `norm2`,
`scale_shift_table`, `temporal`), so the cache plugin can run them on our blocks and on upstream ones alike.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention, RotaryEmbedding, SelfAttention, cut_text_keys
from .checkpoint import load_checkpoint, read_config
from .layers import CaptionEmbedder, FinalLayer, Mlp, PatchEmbed3D, TimestepEmbedder, modulate, pos_embed_2d
from .stdit3_config import STDiT3Config

# Sizes read from device tensors: id -> (weak reference to the tensor, its version, the value read).
_SIZE_MEMO: dict[int, tuple[weakref.ref, int, float]] = {}


# ---------------------------------------------------------------------------------------------------------
# Block math, written against Open-Sora's attribute names only.
# Modulation tensors are (B, Tm, 1, C) with Tm = 1, or Tm = T when a frame mask selects per frame.
# ---------------------------------------------------------------------------------------------------------


def block_modulation(
    block: nn.Module, t: torch.Tensor, x_mask: torch.Tensor | None = None, t0: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, Tm, 1, C)."""
    b = t.shape[0]
    params = (block.scale_shift_table[None] + t.reshape(b, 6, -1)).chunk(6, dim=1)  # (B, 1, C) each
    if x_mask is None:
        return tuple(p[:, :, None] for p in params)
    params0 = (block.scale_shift_table[None] + t0.reshape(b, 6, -1)).chunk(6, dim=1)
    keep = x_mask[:, :, None]  # (B, T, 1): True = noisy frame (uses t), False = clean frame (uses t0)
    return tuple(torch.where(keep, p, p0)[:, :, None] for p, p0 in zip(params, params0))


def modulate_tokens(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) with N = Tm * n, modulated per frame group."""
    b, n, c = x.shape
    return modulate(x.view(b, shift.shape[1], -1, c), shift, scale).view(b, n, c)


def gate_tokens(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    return (gate * x.view(b, gate.shape[1], -1, c)).view(b, n, c)


def block_self_attention(block: nn.Module, x: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """Spatial attention over the S tokens of each frame, or temporal attention over the T frames of each
    spatial position. x is (B, T*S, C) with T outermost."""
    b, n, c = x.shape
    if block.temporal:
        seq = x.view(b, T, S, c).transpose(1, 2).reshape(b * S, T, c)
        return block.attn(seq).view(b, S, T, c).transpose(1, 2).reshape(b, n, c)
    return block.attn(x.reshape(b * T, S, c)).view(b, n, c)


class STDiT3Block(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        temporal: bool = False,
        rope: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm, rope=rope)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        t0: torch.Tensor | None = None,
        T: int | None = None,
        S: int | None = None,
    ) -> torch.Tensor:
        """x (B, T*S, C); y (B, L, C) projected captions; mask (B, L) bool; t, t0 (B, 6C)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block_modulation(self, t, x_mask, t0)
        attn = block_self_attention(self, modulate_tokens(self.norm1(x), shift_msa, scale_msa), T, S)
        x = x + gate_tokens(gate_msa, attn)
        x = x + self.cross_attn(x, y, mask)
        return x + gate_tokens(gate_mlp, self.mlp(modulate_tokens(self.norm2(x), shift_mlp, scale_mlp)))


@dataclass
class Embedded:
    """Everything the blocks and the final layer need, produced once per forward."""

    x: torch.Tensor  # (B, T*S, C) tokens
    y: torch.Tensor  # (B, L, C) projected captions
    mask: torch.Tensor | None  # (B, L) bool
    t: torch.Tensor  # (B, C) timestep (+fps) embedding, for the final layer
    t_mlp: torch.Tensor  # (B, 6C), for the blocks
    t0: torch.Tensor | None  # same at timestep 0, when x_mask is given
    t0_mlp: torch.Tensor | None
    x_mask: torch.Tensor | None
    grid: tuple[int, int, int]  # (T, H, W) in patches
    input_size: tuple[int, int, int]  # (T, H, W) of the latent, to crop the padding
    seq: int  # spatial tokens per frame held here: H*W, or this rank's share under sequence parallelism


class STDiT3(nn.Module):
    def __init__(self, config: STDiT3Config | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = STDiT3Config.from_dict(kwargs)
        elif kwargs:
            raise TypeError("pass either a STDiT3Config or keyword arguments, not both")
        self.config = config
        c = config.hidden_size
        self.rope = RotaryEmbedding(c // config.num_heads)
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.fps_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(config.caption_channels, c, config.model_max_length)
        make = lambda temporal: STDiT3Block(  # noqa: E731
            c, config.num_heads, config.mlp_ratio, config.qk_norm, temporal, self.rope if temporal else None
        )
        self.spatial_blocks = nn.ModuleList([make(False) for _ in range(config.depth)])
        self.temporal_blocks = nn.ModuleList([make(True) for _ in range(config.depth)])
        patch_volume = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
        self.final_layer = FinalLayer(c, patch_volume, config.out_channels)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        config: STDiT3Config | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> STDiT3:
        """Load a checkpoint (file or HF-style directory). The config comes from `config`, else the
        directory's `config.json`, else STDiT3-XL/2. Built on the meta device, so weights are allocated once."""
        if config is None:
            raw = read_config(path)
            config = STDiT3Config.from_dict(raw) if raw is not None else STDiT3Config()
        with torch.device("meta"):
            model = cls(config)
        return load_checkpoint(model, path, dtype=dtype, device=device or "cpu").eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    @property
    def blocks(self) -> list[nn.Module]:
        """Blocks in execution order: spatial 0, temporal 0, spatial 1, ..."""
        return [b for pair in zip(self.spatial_blocks, self.temporal_blocks) for b in pair]

    # -- input checks -----------------------------------------------------------------------------------
    def _check_inputs(self, x, timestep, y, mask, x_mask) -> None:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        if timestep.ndim != 1 or timestep.shape[0] != b:
            raise ValueError(f"timestep must be ({b},), got {tuple(timestep.shape)}")
        if y.ndim != 4 or y.shape[1] != 1 or y.shape[3] != cfg.caption_channels or y.shape[0] != b:
            raise ValueError(f"y must be ({b}, 1, L, {cfg.caption_channels}), got {tuple(y.shape)}")
        if y.shape[2] > cfg.model_max_length:
            raise ValueError(f"text of {y.shape[2]} tokens is longer than model_max_length {cfg.model_max_length}")
        if mask is not None:
            if mask.ndim != 2 or mask.shape[1] != y.shape[2] or b % mask.shape[0]:
                raise ValueError(f"mask must be (B, {y.shape[2]}) for y {tuple(y.shape)}, got {tuple(mask.shape)}")
            # Reading a device tensor's values is a host-device sync, and this runs every forward: only a CPU
            # mask is checked here (free); samplers validate device masks once, before their loop.
            if mask.device.type == "cpu" and not bool((mask != 0).any(dim=1).all()):
                raise ValueError("every caption needs at least one valid token in mask")
        if x_mask is not None and (x_mask.ndim != 2 or tuple(x_mask.shape) != (b, x.shape[2])):
            raise ValueError(f"x_mask must be ({b}, T={x.shape[2]}) bool, got {tuple(x_mask.shape)}")

    @staticmethod
    def _first_value(value: Any, default: float) -> float:
        """The first entry of a per-sample size (height or width) as a Python float, without a sync per forward.

        Numbers and CPU tensors are read directly (no device involved). A device tensor is read once and the
        value remembered for that very tensor object (while it is not modified in place): a sampler passes the
        same tensor at every step, so its loop syncs once, at the first forward, not at each one."""
        if value is None:
            return default
        if not isinstance(value, torch.Tensor):
            return float(value[0] if isinstance(value, (list, tuple)) else value)
        if value.device.type == "cpu":
            return float(value.reshape(-1)[0])
        memo = _SIZE_MEMO
        known = memo.get(id(value))
        if known is not None and known[0]() is value and known[1] == value._version:
            return known[2]
        read = float(value.reshape(-1)[0])
        for key in [k for k, (ref, _, _) in memo.items() if ref() is None]:  # forget tensors that are gone
            del memo[key]
        memo[id(value)] = (weakref.ref(value), value._version, read)
        return read

    # -- forward pieces ---------------------------------------------------------------------------------
    def embed(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        height: torch.Tensor | None = None,
        width: torch.Tensor | None = None,
    ) -> Embedded:
        self._check_inputs(x, timestep, y, mask, x_mask)
        cfg, dtype = self.config, self.dtype
        b, _, tx, hx, wx = x.shape
        pt, ph, pw = cfg.patch_size
        T, H, W = -(-tx // pt), -(-hx // ph), -(-wx // pw)
        S = H * W

        # Open-Sora's position scale uses the requested video size (the first sample's), not the latent size.
        h_px = self._first_value(height, hx * 8.0)
        w_px = self._first_value(width, wx * 8.0)
        scale = (h_px * w_px) ** 0.5 / cfg.input_sq_size
        pos = pos_embed_2d(cfg.hidden_size, H, W, scale, round(S**0.5), x.device, dtype)

        t, t0, t0_mlp, x_mask = self._time(timestep, fps, x_mask, b, x.device)
        y, mask = self._text(y, mask, b)
        tokens = self.x_embedder(x.to(dtype)).view(b, T, S, -1) + pos
        return Embedded(
            x=tokens.reshape(b, T * S, -1),
            y=y,
            mask=mask,
            t=t,
            t_mlp=self.t_block(t),
            t0=t0,
            t0_mlp=t0_mlp,
            x_mask=x_mask,
            grid=(T, H, W),
            input_size=(tx, hx, wx),
            seq=S,
        )

    def _time(self, timestep, fps, x_mask, b: int, device: torch.device) -> tuple:
        """(t, t0, t0's MLP modulation, x_mask per time token): the timestep + fps embedding, and with a frame
        mask the clean frames' embedding at t = 0."""
        dtype = self.dtype
        # The default is made where the model runs: a CPU tensor would be copied to the device every forward.
        fps = torch.full((b,), 24.0, device=device) if fps is None else fps.reshape(-1)
        if fps.shape[0] != b:  # samplers pass per-prompt values for the CFG-doubled batch
            fps = fps.repeat(b // fps.shape[0])
        fps_emb = self.fps_embedder(fps.to(device=device, dtype=dtype))
        t = self.t_embedder(timestep.to(dtype)) + fps_emb
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep, dtype=dtype)) + fps_emb
            t0_mlp = self.t_block(t0)
            x_mask = x_mask.bool()
            pt = self.config.patch_size[0]
            if pt > 1:  # a time token spans pt latent frames: it is clean (t0) only when all of them are
                x_mask = F.pad(x_mask, (0, -x_mask.shape[1] % pt), value=True).view(x_mask.shape[0], -1, pt).any(-1)
        return t, t0, t0_mlp, x_mask

    def _text(self, y: torch.Tensor, mask: torch.Tensor | None, b: int) -> tuple:
        """The caption tokens embedded (B, L, C), and the mask of the keys cross-attention reads (or None)."""
        if mask is not None and mask.device.type == "cpu":
            # Its values are free to read: drop the text positions no row attends to (and the mask when every
            # row is valid on the rest). A device mask is cut by the sampler, once per sample (a read is a sync).
            y, mask = cut_text_keys(y, mask)
        y = self.y_embedder(y.to(self.dtype)).squeeze(1)  # (B, L, C)
        if mask is not None:
            mask = mask.to(y.device).bool().repeat(b // mask.shape[0], 1)
        return y, mask

    def run_blocks(self, e: Embedded) -> torch.Tensor:
        x = e.x
        for block in self.blocks:
            x = block(x, e.y, e.t_mlp, e.mask, e.x_mask, e.t0_mlp, e.grid[0], e.seq)
        return x

    def unpatchify(self, x: torch.Tensor, e: Embedded) -> torch.Tensor:
        """(B, T*H*W, pt*ph*pw*C_out) -> (B, C_out, T', H', W') cropped to the input size."""
        (T, H, W), (tx, hx, wx) = e.grid, e.input_size
        pt, ph, pw = self.config.patch_size
        b, c_out = x.shape[0], self.config.out_channels
        x = x.view(b, T, H, W, pt, ph, pw, c_out).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c_out, T * pt, H * ph, W * pw)[:, :, :tx, :hx, :wx]

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        height: torch.Tensor | None = None,
        width: torch.Tensor | None = None,
        num_frames: Any = None,  # accepted (samplers pass it for the timestep transform), not used
    ) -> torch.Tensor:
        """Predict (B, out_channels, T, H, W) in fp32 from latents x (B, C, T, H, W).

        fps defaults to 24, height/width to 8x the latent size (the VAE's spatial factor).
        """
        e = self.embed(x, timestep, y, mask, x_mask, fps, height, width)
        x = self.run_blocks(e)
        x = self.final_layer(x, e.t, e.x_mask, e.t0)
        return self.unpatchify(x, e).float()
