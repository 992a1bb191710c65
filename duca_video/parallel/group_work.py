"""Work a video group (its SP ranks, and both CFG halves under CFG parallelism) shares instead of repeating it,
and `GroupRunner`, the one object through which the pipeline does a batch's parallel work.

- Text: the group's writer runs the text encoder; a broadcast (shape and dtype, then the data) gives every
  rank of the group the embeddings. Other ranks never load the encoder (T5-XXL is ~19 GB in fp32).
- VAE decoding: the latent's 17-frame chunks are independent, so SP rank r decodes chunks r, r + p, ...; one
  all-gather brings every chunk to the writer, which assembles the video. Under CFG parallelism both halves
  hold the same latent; only the writer's half decodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .comm import CommStats, all_gather_tokens
from .launch import ParallelContext

if TYPE_CHECKING:
    from .sequence import SequenceParallel

# The dtypes a broadcast header can name, by index. The header travels as a small long tensor that every rank
# can allocate without knowing anything about the payload.
_HEADER_DTYPES = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
)
_HEADER_DIMS = 8


def _header(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype not in _HEADER_DTYPES or tensor.dim() > _HEADER_DIMS:
        raise ValueError(
            f"cannot broadcast a {tensor.dtype} tensor of shape {tuple(tensor.shape)}: allowed dtypes "
            f"{', '.join(map(str, _HEADER_DTYPES))}, at most {_HEADER_DIMS} dims"
        )
    values = [_HEADER_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
    return torch.tensor(values + [0] * (2 + _HEADER_DIMS - len(values)), dtype=torch.long, device=tensor.device)


def broadcast_from_writer(
    tensor: torch.Tensor | None, ctx: ParallelContext, device: torch.device | None = None
) -> torch.Tensor:
    """`tensor` as the group's writer has it, on `device` (default: where `tensor` is); the other ranks may pass
    None (then `device` is needed) or any tensor: only its device is used.

    The writer sends dtype and shape first and the others allocate from that, so what they receive always
    fits: a receiver that guessed (say fp32 where a bf16 T5 sends bf16) would read garbage or hang.
    """
    if ctx.group_size == 1:
        return tensor
    if device is None:
        if tensor is None:
            raise ValueError("broadcast_from_writer: pass the device when there is no tensor")
        device = tensor.device
    src = dist.get_global_rank(ctx.group, 0)  # the writer: rank 0 of its CFG half and of its SP group
    if ctx.is_writer:
        tensor = tensor.to(device).contiguous()
        header = _header(tensor)
    else:
        header = torch.zeros(2 + _HEADER_DIMS, dtype=torch.long, device=device)
    dist.broadcast(header, src=src, group=ctx.group)
    if not ctx.is_writer:
        code, ndim, *dims = header.tolist()
        tensor = torch.empty(dims[:ndim], dtype=_HEADER_DTYPES[code], device=device)
    dist.broadcast(tensor, src=src, group=ctx.group)
    return tensor


class TextShape:
    """Stands in for the text encoder on the ranks of an SP group that do not run it: the sizes the STDiT is
    built with. What the writer's encoder produces (shape and dtype) arrives with its broadcast."""

    def __init__(self, output_dim: int, model_max_length: int) -> None:
        self.output_dim = output_dim
        self.model_max_length = model_max_length


def encode_text(encoder, prompts: list[str], ctx: ParallelContext, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(y, mask) on `device`, encoded once per group: by the writer, broadcast to the others."""
    if isinstance(encoder, TextShape):
        if ctx.is_writer or ctx.group_size == 1:
            raise RuntimeError("encode_text: the group's writer needs the real text encoder, got a TextShape")
        y, mask = broadcast_from_writer(None, ctx, device), broadcast_from_writer(None, ctx, device)
        expected = (len(prompts), 1, encoder.model_max_length, encoder.output_dim)
        if tuple(y.shape) != expected or tuple(mask.shape) != (expected[0], expected[2]):
            raise RuntimeError(
                f"the writer's text encoder sent y {tuple(y.shape)} and mask {tuple(mask.shape)}; "
                f"this rank's model expects y {expected}"
            )
        return y, mask
    encoded = encoder.encode(prompts)
    y, mask = encoded["y"].to(device), encoded["mask"].to(device)
    return broadcast_from_writer(y, ctx, device), broadcast_from_writer(mask, ctx, device)


def frame_chunks(num_frames: int, micro_frames: int, micro_latents: int) -> list[tuple[int, int]]:
    """(first latent frame, pixel frames) of each chunk the VAE decodes on its own."""
    chunks, remaining, start = [], num_frames, 0
    while remaining > 0:
        chunks.append((start, min(micro_frames, remaining)))
        remaining -= micro_frames
        start += micro_latents
    return chunks


def decode_across(vae, z: torch.Tensor, num_frames: int, ctx: ParallelContext, stats: CommStats | None = None):
    """Decode z (B, C, t, h, w) to pixels; under SP the chunks are split over the group. Returns the video on
    the writer and None on the other ranks."""
    if ctx.cfg_rank != 0:  # the other CFG half holds the same latent: the writer's half decodes it
        return None
    micro_frames = getattr(vae, "micro_frame_size", None)
    micro_latents = getattr(vae, "micro_z_frame_size", None)
    if ctx.sp_size == 1 or micro_frames is None or micro_latents is None:
        return vae.decode(z, num_frames=num_frames) if ctx.is_writer else None
    chunks = frame_chunks(num_frames, micro_frames, micro_latents)
    p = ctx.sp_size
    mine = [vae.decode(z[:, :, s : s + micro_latents], num_frames=n) for s, n in chunks[ctx.sp_rank :: p]]
    # Every rank sends the same shape: its chunks padded to micro_frames frames, and to the largest count.
    per_rank = -(-len(chunks) // p)
    _, fh, fw = vae.spatial_vae.patch_size
    b, _, _, h, w = z.shape
    buf = z.new_zeros(per_rank, b, 3, micro_frames, h * fh, w * fw)
    for i, video in enumerate(mine):
        buf[i, :, :, : video.shape[2]] = video
    gathered = all_gather_tokens(buf, ctx.sp_group, stats or CommStats(), "vae_frames")  # (p, per_rank, ...)
    if not ctx.is_writer:
        return None
    parts = [gathered[j % p, j // p][:, :, :n] for j, (_, n) in enumerate(chunks)]
    return torch.cat(parts, dim=2)


@dataclass
class GroupRunner:
    """A batch's work in the places where parallelism shows, so the pipeline has no parallel branches of its own:
    `encode` (the writer runs the text encoder, the group receives), `sample` (the CFG pair exchanges each step's
    prediction), `gather` (the latent from its SP shards), `decode` (chunks over the SP ranks, the video on the
    writer, None elsewhere) and `share` (a writer's tensor to the whole group). On one process each is the plain
    single-device call."""

    ctx: ParallelContext
    sp: SequenceParallel | None = None
    device: torch.device | None = None

    def encode(self, encoder: Any, texts: list[str]) -> tuple[torch.Tensor, ...]:
        return encode_text(encoder, texts, self.ctx, self.device)

    def sample(self, sampler: Any, model: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return sampler.sample(model, *args, **kwargs)

    def gather(self, latents: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
        return latents if self.sp is None else self.sp.gather_latents(latents, patch_size)

    def decode(self, vae: Any, latents: torch.Tensor, num_frames: int) -> torch.Tensor | None:
        return decode_across(vae, latents, num_frames, self.ctx, None if self.sp is None else self.sp.stats)

    def share(self, tensor: torch.Tensor | None) -> torch.Tensor:
        return broadcast_from_writer(tensor, self.ctx, self.device)
