"""Attention keys cut instead of masked: text keys to the batch's longest caption (no mask when the lengths
agree), sequence-parallel padding cut from the spatial keys. Same results as the uncut, masked calls.

The uncut reference is the previous behaviour: `cut_text_keys` replaced by the identity where the model and the
sampler call it, so the model sees all L text positions and the (B, L) mask at every forward.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from duca_video import cache
from duca_video.models import attention, stdit3
from duca_video.models.attention import cut_text_keys, fused_attention, text_key_cut
from duca_video.parallel.comm import SimulatedGroup, heads_to_seq, seq_to_heads
from duca_video.parallel.sequence import SequenceParallel, ulysses_attention
from duca_video.sampling import rflow
from tests.helpers import sample, tiny_inputs, tiny_model


class SdpaCalls(TorchDispatchMode):
    """Records (query length, key length, whether a mask was passed) of every SDPA kernel call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "scaled_dot_product" in str(func) and "choice" not in str(func):
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.calls.append((args[0].shape[-2], args[1].shape[-2], isinstance(mask, torch.Tensor)))
        return func(*args, **kwargs)


def _uncut(monkeypatch):
    keep_all = lambda y, mask: (y, mask)  # noqa: E731
    monkeypatch.setattr(stdit3, "cut_text_keys", keep_all)
    monkeypatch.setattr(rflow, "cut_text_keys", keep_all)


def _mask(lengths, width=8):
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask


def test_key_cut_is_the_longest_caption_and_says_when_no_mask_is_needed():
    assert text_key_cut(_mask([3, 5])) == (5, False)
    assert text_key_cut(_mask([4, 4, 4])) == (4, True)
    assert text_key_cut(_mask([8, 2])) == (8, False)
    holes = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]])  # not a prefix: cut after the last valid key, keep the mask
    assert text_key_cut(holes) == (3, False)
    y = torch.randn(2, 1, 4, 6)
    y_cut, m_cut = cut_text_keys(y, holes)
    assert y_cut.shape == (2, 1, 3, 6) and m_cut.tolist() == [[1, 0, 1], [1, 1, 0]]
    y_cut, m_cut = cut_text_keys(y, torch.tensor([[1, 1, 0, 0]] * 2))
    assert y_cut.shape == (2, 1, 2, 6) and m_cut is None
    with pytest.raises(ValueError, match="at least one valid token"):
        text_key_cut(_mask([3, 0]))


@pytest.mark.parametrize("lengths, keys, masked", [((3, 5), 5, True), ((4, 4), 4, False)])
def test_model_cuts_text_keys_and_equals_the_uncut_model(monkeypatch, lengths, keys, masked):
    model, inputs = tiny_model(), tiny_inputs(lengths=lengths)
    calls = SdpaCalls()
    with torch.no_grad(), calls:
        cut = model(**inputs)
    text_calls = {(k, m) for _, k, m in calls.calls if k not in (3, 20)}  # not temporal (T=3) / spatial (S=20)
    assert text_calls == {(keys, masked)}, calls.calls
    _uncut(monkeypatch)
    calls = SdpaCalls()
    with torch.no_grad(), calls:
        full = model(**inputs)
    assert {(k, m) for _, k, m in calls.calls if k not in (3, 20)} == {(8, True)}
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["toca", "duca"])
@pytest.mark.parametrize("lengths", [(3, 5), (4, 4)])
def test_cached_sample_with_cut_text_equals_the_uncut_one(monkeypatch, float64_default, method, lengths):
    # toca's selector is the cross-attention entropy, which reads the text keys and their mask.
    # In float64: over 8 CFG steps this tiny model amplifies float32 rounding (which SDPA kernel, masked or cut,
    # sums in which order differs by CPU) up to 1e-3, cached or not; in float64 they agree to 1e-12 (measured: 0).
    model = tiny_model().double()
    for block in model.blocks:  # peaked text attention: entropy scores far apart, no near-ties to flip
        block.cross_attn.q_linear.weight.data.normal_(0, 1.0)
        block.cross_attn.kv_linear.weight.data.normal_(0, 1.0)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["y"].shape[2], kw["mask"])), with_kwargs=True)
    controller = cache.enable(model, method)
    cut = sample(model, steps=8, lengths=lengths)
    kinds = [h["kind"] for h in controller.history]
    assert "conservative" in kinds
    keep = max(lengths)
    assert all(length == keep for length, _ in seen)
    assert all((mask is None) == (len(set(lengths)) == 1) for _, mask in seen)
    _uncut(monkeypatch)
    seen.clear()
    controller = cache.enable(model, method)
    full = sample(model, steps=8, lengths=lengths)
    assert {length for length, _ in seen} == {8} and [h["kind"] for h in controller.history] == kinds
    assert cut.dtype == torch.float64
    torch.testing.assert_close(cut, full, atol=1e-12, rtol=0)


def test_sampler_reads_the_mask_once_per_sample(monkeypatch):
    model = tiny_model()
    cache.enable(model, "duca")
    reads = []
    real = attention.text_key_cut
    monkeypatch.setattr(attention, "text_key_cut", lambda mask: reads.append(mask.shape) or real(mask))
    sample(model, steps=6, lengths=(3, 5))
    # Once on the sampler's CFG-doubled (4, 8) mask. Each forward then gets the cut (4, 5) mask, which the model
    # looks at only because it is a CPU tensor here (free); a device mask it never reads.
    assert reads[0] == torch.Size([4, 8]) and set(reads[1:]) == {torch.Size([4, 5])}, reads


@pytest.mark.parametrize("rank", [0, 3])
def test_sequence_parallel_attention_cuts_padded_keys_and_equals_masking(rank):
    # 15 spatial positions over 4 ranks: padded to 16, the last gathered position is padding.
    torch.manual_seed(0)
    model = tiny_model()
    attn = model.spatial_blocks[0].attn
    sp = SequenceParallel(SimulatedGroup(size=4, rank=rank))
    x = sp.shard(torch.randn(2, 3, 15, 64)).view(6, 4, 64)  # (B*T, s_local, C)
    calls = SdpaCalls()
    with torch.no_grad(), calls:
        out = ulysses_attention(attn, sp, x)
    assert calls.calls == [(16, 15, False)]  # all padded queries, the real keys only, no mask

    # The masked computation the model made before, from the same pieces.
    with torch.no_grad():
        b, n, c = x.shape
        q, k, v = attn.qkv(x).view(b, n, 3, attn.num_heads, attn.head_dim).unbind(2)
        qkv = torch.stack((attn.q_norm(q), attn.k_norm(k), v), dim=2)
        q, k, v = seq_to_heads(qkv, sp.group, sp.stats).permute(2, 0, 3, 1, 4).unbind(0)
        ref = fused_attention(q, k, v, sp.key_mask(b, x.device))
        ref = attn.proj(heads_to_seq(ref.transpose(1, 2), sp.group, sp.stats).reshape(b, n, c))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
