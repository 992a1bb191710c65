"""rotary-embedding-torch's RotaryEmbedding (language-model frequencies, interleaved channel pairs)."""

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    x1, x2 = pairs.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, theta: float = 10000.0, learned_freq: bool = False) -> None:
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=learned_freq)

    def rotate_queries_or_keys(self, t: torch.Tensor, seq_dim: int = -2) -> torch.Tensor:
        n = t.shape[seq_dim]
        pos = torch.arange(n, device=t.device, dtype=self.freqs.dtype)
        angles = (pos[:, None] * self.freqs[None]).repeat_interleave(2, dim=-1)  # (n, dim)
        if seq_dim != -2:
            raise NotImplementedError("the stand-in rotates along dim -2 only")
        rot = angles.shape[-1]
        head, tail = t[..., :rot], t[..., rot:]
        head = head * angles.cos().to(t.dtype) + rotate_half(head) * angles.sin().to(t.dtype)
        return torch.cat((head, tail), dim=-1)
