"""Work a sequence-parallel group shares instead of repeating it on every rank.

- Text: the group's writer (sp rank 0) runs the text encoder; one broadcast gives every rank the embeddings.
  Other ranks never load the encoder (T5-XXL is ~19 GB in fp32).
- VAE decoding: the latent's 17-frame chunks are independent, so rank r decodes chunks r, r + p, ...; one
  all-gather brings every chunk to the writer, which assembles the video.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import CommStats, all_gather_tokens
from .launch import ParallelContext


def broadcast_from_writer(tensor: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """`tensor` as the group's writer has it (other ranks pass an allocated tensor of the same shape)."""
    if ctx.sp_size == 1:
        return tensor
    tensor = tensor.contiguous()
    dist.broadcast(tensor, src=dist.get_global_rank(ctx.sp_group, 0), group=ctx.sp_group)
    return tensor


class TextShape:
    """What a rank without the text encoder needs to receive its output."""

    def __init__(self, output_dim: int, model_max_length: int) -> None:
        self.output_dim = output_dim
        self.model_max_length = model_max_length

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:  # filled by the broadcast
        n = len(prompts)
        return {"y": torch.empty(n, 1, self.model_max_length, self.output_dim),
                "mask": torch.empty(n, self.model_max_length, dtype=torch.long)}  # fmt: skip


def encode_text(encoder, prompts: list[str], ctx: ParallelContext, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(y, mask) on `device`, encoded once per group."""
    encoded = encoder.encode(prompts)
    y, mask = encoded["y"].to(device), encoded["mask"].to(device)
    return broadcast_from_writer(y, ctx), broadcast_from_writer(mask, ctx)


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
