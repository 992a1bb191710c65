"""xformers' BlockDiagonalMask: query block i attends to key block i only."""

from dataclasses import dataclass


def _ranges(lengths):
    out, start = [], 0
    for n in lengths:
        out.append((start, start + int(n)))
        start += int(n)
    return out


@dataclass
class BlockDiagonalMask:
    q_seqlen: list
    kv_seqlen: list

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        q = [int(n) for n in q_seqlen]
        kv = q if kv_seqlen is None else [int(n) for n in kv_seqlen]
        if len(q) != len(kv):
            raise ValueError(f"{len(q)} query blocks but {len(kv)} key blocks")
        return cls(q, kv)

    def q_ranges(self):
        return _ranges(self.q_seqlen)

    def k_ranges(self):
        return _ranges(self.kv_seqlen)
