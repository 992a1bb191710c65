"""A word-level text encoder for the testbed model: one learned embedding per grammar word.

It follows the `TextEncoder` protocol of `duca_video.models.text_encoder` (the T5 wrapper's interface), so the
pipeline and the caching code can swap it for T5. The embeddings are trained jointly with the tiny STDiT3 and
saved next to its weights (`text_encoder.safetensors` + `text_encoder.json` holding the vocabulary).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.text_encoder import NullCaptionSource, check_prompts
from .grammar import PAD, UNK, vocabulary

__all__ = ["WordTextEncoder"]

WEIGHTS_NAME = "text_encoder.safetensors"
CONFIG_NAME = "text_encoder.json"
_WORD = re.compile(r"[a-z]+|<unk>|<pad>")


class WordTextEncoder(NullCaptionSource, nn.Module):
    """Lower-cased words -> learned vectors (B, 1, L, C), padded with <pad> to `model_max_length`.

    In train mode `encode` is differentiable (the embeddings learn with the model); in eval mode it returns
    detached tensors, as the T5 wrapper does. Unknown words become <unk> with a warning naming them.
    """

    def __init__(
        self,
        words: Sequence[str] | None = None,
        output_dim: int = 64,
        model_max_length: int = 16,
        strict: bool = False,
    ) -> None:
        super().__init__()
        words = list(vocabulary() if words is None else words)
        if words[:2] != [PAD, UNK]:
            raise ValueError(f"the vocabulary must start with {PAD!r}, {UNK!r}; got {words[:2]}")
        if len(set(words)) != len(words):
            raise ValueError("the vocabulary has duplicate words")
        if output_dim < 1 or model_max_length < 1:
            raise ValueError("output_dim and model_max_length must be positive")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.output_dim = int(output_dim)
        self.model_max_length = int(model_max_length)
        self.strict = strict
        self.embedding = nn.Embedding(len(words), output_dim, padding_idx=0)
        # Same scale as STDiT3's null caption (randn / sqrt(C)) so real and null captions start alike.
        nn.init.normal_(self.embedding.weight, std=output_dim**-0.5)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return self.output_dim

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    # ------------------------------------------------------------------ text -> ids
    def split(self, prompt: str) -> list[str]:
        """Lower-cased words; punctuation and digits separate words and are dropped."""
        return _WORD.findall(prompt.lower())

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L) long, mask (B, L) long) with L = model_max_length."""
        prompts = check_prompts(prompts)
        L = self.model_max_length
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        mask = torch.zeros(len(prompts), L, dtype=torch.long)
        unknown: list[str] = []
        for i, prompt in enumerate(prompts):
            words = self.split(prompt)
            if not words:
                raise ValueError(f"prompt {i} ({prompt!r}) has no words; an empty caption cannot be encoded")
            if len(words) > L:
                msg = f"prompt {i} has {len(words)} words; the limit is {L} (the rest is dropped)"
                if self.strict:
                    raise ValueError(msg)
                warnings.warn(msg, stacklevel=3)
                words = words[:L]
            unknown += [w for w in words if w not in self.index]
            ids[i, : len(words)] = torch.tensor([self.index.get(w, 1) for w in words])
            mask[i, : len(words)] = 1
        if unknown:
            msg = f"unknown words mapped to {UNK}: {sorted(set(unknown))}"
            if self.strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=3)
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ the TextEncoder protocol
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, 1, L, C) embeddings (differentiable)."""
        return self.embedding(ids)[:, None]

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{"y": (B, 1, L, C) float, "mask": (B, L) long}."""
        ids, mask = self.tokenize(prompts)
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            y = self.embed_ids(ids)
        return {"y": y if self.training else y.detach(), "mask": mask}

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {"embedding.weight": self.embedding.weight.detach().float().cpu().contiguous()},
            str(directory / WEIGHTS_NAME),
        )
        meta = {"words": self.words, "output_dim": self.output_dim, "model_max_length": self.model_max_length}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", strict: bool = False
    ) -> WordTextEncoder:
        """Load `text_encoder.json` + `text_encoder.safetensors` from `directory`; returned in eval mode."""
        directory = Path(directory).expanduser()
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"word text encoder file not found: {path}")
        meta = json.loads(config_path.read_text())
        encoder = cls(meta["words"], meta["output_dim"], meta["model_max_length"], strict=strict)
        state = load_file(str(weights_path))
        if set(state) != {"embedding.weight"}:
            raise ValueError(f"{weights_path}: expected only 'embedding.weight', got {sorted(state)}")
        encoder.load_state_dict(state, strict=True)
        return encoder.to(device).eval()
