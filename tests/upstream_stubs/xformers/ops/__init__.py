"""xformers' memory_efficient_attention on (1, tokens, heads, dim) tensors, in plain torch."""

import torch
import torch.nn.functional as F

from . import fmha  # noqa: F401


def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
    """q (B, M, H, d), k/v (B, L, H, d) -> (B, M, H, d); a BlockDiagonalMask pairs query and key blocks."""
    if p:
        raise NotImplementedError("the stand-in runs inference only (p must be 0)")
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, n, d)
    if attn_bias is None:
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale).transpose(1, 2).contiguous()
    outs = []
    for (q0, q1), (k0, k1) in zip(attn_bias.q_ranges(), attn_bias.k_ranges()):
        outs.append(F.scaled_dot_product_attention(qh[:, :, q0:q1], kh[:, :, k0:k1], vh[:, :, k0:k1], scale=scale))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()
