"""Token selectors for conservative steps: which tokens get recomputed.

A selector turns a score per token (B, N) into the indices (B, k) of the k highest-scoring valid tokens.
Random scores are drawn on the CPU, per video, from a generator seeded by (video seed, step, block), so the
choice is reproducible, independent of the batch the video is in, identical on every rank of a sequence-parallel
group, and shared by the two CFG halves.
Only `cross_entropy` looks at attention probabilities, and only for the layers that use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def token_generator(seed: int | None, step: int, block: int) -> torch.Generator:
    mixed = ((seed or 0) * 1_000_003 + step * 7_919 + block * 104_729) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def row_generators(seeds: Sequence[int], step: int, block: int, rows: int, cfg: bool) -> list[torch.Generator]:
    """One generator per row of the model batch, from that row's video seed: a video's selection is the same
    in any batch, at any row, after any resume. With CFG the null half reuses its prompt's generator seed."""
    videos = rows // 2 if cfg else rows
    if len(seeds) != videos:
        raise ValueError(f"token selection: {len(seeds)} video seed(s) for a batch of {videos} video(s)")
    gens = [token_generator(s, step, block) for s in seeds]
    return gens + [token_generator(s, step, block) for s in seeds] if cfg else gens


def _uniform(gens: list[torch.Generator], n_tokens: int) -> torch.Tensor:
    return torch.stack([torch.rand(n_tokens, generator=g) for g in gens])


def random_scores(rows: int, n_tokens: int, cfg: bool, seeds: Sequence[int], step: int, block: int) -> torch.Tensor:
    """(rows, N) uniform scores, one draw per video; with CFG the null half repeats the cond half."""
    return _uniform(row_generators(seeds, step, block, rows, cfg), n_tokens)


def random_frame_scores(
    rows: int, frames: int, per_frame: int, cfg: bool, seeds: Sequence[int], step: int, block: int
) -> torch.Tensor:
    """Stratified: every frame gets the same share of the selection (ties broken by one random draw).

    Scores are ranks within each frame, so the global top-k takes an equal count from every frame."""
    scores = random_scores(rows, frames * per_frame, cfg, seeds, step, block).view(rows, frames, per_frame)
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1).float()  # 0 = best within the frame
    # Smaller rank first; the frame's own random number breaks ties so no frame is favoured systematically.
    return (-rank + scores * 1e-3).view(rows, frames * per_frame)


def similarity_scores(x: torch.Tensor, base_fraction: float, lowest: bool, gens: list[torch.Generator]) -> torch.Tensor:
    """Scores from cosine similarity to a random 1% of base tokens (DuCa's experiment).

    `lowest=True` favours tokens least similar to the base (the diverse choice), False the most similar.
    Base tokens themselves always score highest."""
    rows, n, _ = x.shape
    n_base = max(1, round(base_fraction * n))
    base = _uniform(gens, n).argsort(dim=1)[:, :n_base].to(x.device)
    feats = F.normalize(x.float(), dim=-1)
    base_feats = feats.gather(1, base[..., None].expand(-1, -1, feats.shape[-1]))
    sim = torch.einsum("bnc,bkc->bnk", feats, base_feats).amax(dim=-1)
    scores = -sim if lowest else sim
    return scores.scatter(1, base, float("inf"))


def norm_scores(features: torch.Tensor) -> torch.Tensor:
    """L2 norm per token of (B, N, C) features (keys or values of self-attention)."""
    return features.float().norm(dim=-1)


def attention_entropy(
    q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, heads: int, chunk: int = 4096
) -> torch.Tensor:
    """Mean-over-heads entropy of softmax(q k^T / sqrt(d)) per query token: q (B, N, C), k (B, L, C).

    Computed in chunks of queries so the probabilities of a whole layer never exist at once."""
    b, n, c = q.shape
    d = c // heads
    kh = k.view(b, k.shape[1], heads, d).transpose(1, 2).float()  # (B, h, L, d)
    out = torch.empty(b, n, device=q.device)
    for start in range(0, n, chunk):
        qh = q[:, start : start + chunk].view(b, -1, heads, d).transpose(1, 2).float()
        logits = qh @ kh.transpose(-1, -2) / d**0.5
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        logp = logits.log_softmax(dim=-1)
        ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # (B, h, chunk)
        out[:, start : start + chunk] = ent.mean(1)
    return out


def top_k(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (B, k) of the k highest scores per row among valid tokens, sorted ascending (cache-friendly)."""
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
        fewest = int(valid.sum(dim=1).min())
        if k > fewest:
            raise ValueError(f"asked to select {k} tokens but a row has only {fewest} valid tokens")
    if k >= scores.shape[1]:
        return torch.arange(scores.shape[1], device=scores.device).expand(scores.shape[0], -1)
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B, k) -> (B, k, C)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens_(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """In place: x[b, idx[b, j]] = rows[b, j]."""
    return x.scatter_(1, idx[..., None].expand(-1, -1, x.shape[-1]), rows.to(x.dtype))
