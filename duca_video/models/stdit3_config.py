"""STDiT3's configuration: Open-Sora 1.2's field names and defaults (STDiT3-XL/2), every field checked on
construction with an error naming it, and the config.json keys that change nothing at inference."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Keys Open-Sora's STDiT3Config (and HF's config.json) carry that change nothing at inference.
_IGNORED_CONFIG_KEYS = {
    "input_size",
    "class_dropout_prob",
    "drop_path",
    "enable_flash_attn",
    "enable_layernorm_kernel",
    "enable_sequence_parallelism",
    "only_train_temporal",
    "freeze_y_embedder",
    "architectures",
    "model_type",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "from_pretrained",
    "type",
    "testbed",  # our small trained model's data/sampler settings, next to its architecture
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class STDiT3Config:
    """Open-Sora 1.2 STDiT3 hyper-parameters; the defaults are STDiT3-XL/2."""

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    pred_sigma: bool = True
    input_sq_size: int = 512
    mlp_ratio: float = 4.0
    skip_y_embedder: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self._check_types()
        self._check_architecture()

    def _check_types(self) -> None:
        # Types first, each error naming the field: a float patch size or a "yes" flag would otherwise be
        # truncated or taken as true without a word.
        for name in (
            "depth",
            "hidden_size",
            "num_heads",
            "in_channels",
            "caption_channels",
            "model_max_length",
            "input_sq_size",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                error = ValueError if _is_int(value) else TypeError
                raise error(f"STDiT3Config.{name}={value!r} is not allowed: expected a positive int")
        ps = self.patch_size
        if not isinstance(ps, (list, tuple)) or not all(_is_int(p) for p in ps):
            raise TypeError(f"STDiT3Config.patch_size={ps!r} is not allowed: expected 3 positive ints (t, h, w)")
        if len(ps) != 3 or min(ps) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (t, h, w), got {tuple(ps)}")
        self.patch_size = tuple(ps)
        for name in ("qk_norm", "pred_sigma", "skip_y_embedder"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"STDiT3Config.{name}={getattr(self, name)!r} is not allowed: expected True or False")
        r = self.mlp_ratio
        number = isinstance(r, (int, float)) and not isinstance(r, bool)
        if not number or not math.isfinite(r) or r <= 0:
            error = ValueError if number else TypeError
            raise error(f"STDiT3Config.mlp_ratio={r!r} is not allowed: expected a finite number > 0")

    def _check_architecture(self) -> None:
        r = self.mlp_ratio
        if int(self.hidden_size * r) < 1:
            raise ValueError(f"STDiT3Config: mlp_ratio {r} gives an MLP of {int(self.hidden_size * r)} features")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"STDiT3Config: num_heads {self.num_heads} does not divide hidden_size {self.hidden_size}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"STDiT3Config: head dim {self.hidden_size // self.num_heads} must be even (RoPE)")
        if self.hidden_size % 4:
            raise ValueError(f"STDiT3Config: hidden_size {self.hidden_size} must be divisible by 4")
        if self.skip_y_embedder:
            raise ValueError("STDiT3Config: skip_y_embedder=True (pre-projected captions) is not supported")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> STDiT3Config:
        """Build from Open-Sora / HF `config.json` keys; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - _IGNORED_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown STDiT3 config keys {unknown}; allowed: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d.pop("skip_y_embedder")
        return d
