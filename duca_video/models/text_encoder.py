"""Text encoders for STDiT3: the T5 v1.1 encoder Open-Sora 1.2 uses, and the protocol any encoder follows.

An encoder turns prompts into `y` (B, 1, L, C) caption embeddings plus a (B, L) token mask. The null caption
for classifier-free guidance is not produced by the encoder: it is the STDiT model's learned
`y_embedder.y_embedding` buffer (L, C), see `null_caption`.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "OFFLOAD_MODES",
    "T5LoadError",
    "T5TextEncoder",
    "TextEncoder",
    "check_prompts",
    "load_t5_tokenizer",
    "null_caption",
]

# Where T5's weights go between encodings: "none" stays on the device; "cpu" lives in host memory and visits the
# device only to encode; "free" drops the weights after each encoding and reloads them from the folder when needed.
OFFLOAD_MODES = ("none", "cpu", "free")


@runtime_checkable
class TextEncoder(Protocol):
    """What the pipeline needs from a text encoder (T5 here; a small word-level encoder for toy models)."""

    model_max_length: int  # L: every encoding is padded/truncated to this many tokens
    output_dim: int  # C: the channel size of y (the STDiT's caption_channels)

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Returns {"y": (B, 1, L, C) float tensor, "mask": (B, L) long tensor, 1 = valid token}."""
        ...

    def null(self, n: int) -> torch.Tensor:
        """The (n, 1, L, C) null caption for classifier-free guidance."""
        ...


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts as a non-empty list of str; a bare string or anything else is refused with a clear error."""
    if isinstance(prompts, str):
        raise TypeError("encode takes a list of prompts, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode needs at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("every prompt must be a str")
    return prompts


def _y_embedding(model: Any) -> torch.Tensor:
    # Wrappers (DDP's .module, torch.compile's ._orig_mod) hide the STDiT; look through them.
    seen = model
    for _ in range(4):
        emb = getattr(getattr(seen, "y_embedder", None), "y_embedding", None)
        if isinstance(emb, torch.Tensor):
            return emb
        seen = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if seen is None:
            break
    raise AttributeError(f"{type(model).__name__} has no y_embedder.y_embedding tensor to take the null caption from")


def null_caption(model: Any, n: int) -> torch.Tensor:
    """The model's learned null caption `y_embedder.y_embedding` (L, C) repeated to (n, 1, L, C).

    A copy, not a view, so that in-place edits of the result can never reach the model's buffer.
    """
    if n < 0:
        raise ValueError(f"null_caption: n must be >= 0, got {n}")
    emb = _y_embedding(model)
    if emb.dim() != 2:
        raise ValueError(f"y_embedder.y_embedding must be (L, C), got shape {tuple(emb.shape)}")
    return emb.detach()[None, None].repeat(n, 1, 1, 1)


def _dtype_kwarg() -> str:
    # transformers renamed from_pretrained's torch_dtype to dtype in 4.56 (the old name warns in 5.x).
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


class NullCaptionSource:
    """`attach(model)` once, then `null(n)` gives that model's null caption (upstream sets the text encoder's
    `y_embedder` the same way). Shared by every text encoder."""

    _null_source: Any = None

    def attach(self, model: Any):
        _y_embedding(model)  # fail now rather than at the first sample
        self.__dict__["_null_source"] = model  # a plain reference: never a registered submodule of an encoder
        return self

    def null(self, n: int, model: Any = None) -> torch.Tensor:
        """The model's `y_embedder.y_embedding` as (n, 1, L, C): the null caption used for CFG."""
        source = model if model is not None else self._null_source
        if source is None:
            raise RuntimeError(f"{type(self).__name__}.null needs a model: pass it, or call attach(model) once")
        return null_caption(source, n)


class T5LoadError(ValueError):
    """A T5 folder whose tokenizer cannot be loaded here; the message names the folder and the fix."""


def _check_sentencepiece_folder(path: Path) -> None:
    # Without tokenizer.json (DeepFloyd/t5-v1_1-xxl ships only spiece.model), transformers converts spiece.model
    # into a fast tokenizer, which needs protobuf; when that fails it falls back to reading the file as tiktoken
    # and dies with an unrelated traceback. Check the preconditions first so that the error says what is wrong.
    spiece = path / "spiece.model"
    if (path / "tokenizer.json").is_file():
        return
    if not spiece.is_file():
        raise T5LoadError(
            f"T5 tokenizer folder {path} has neither tokenizer.json nor spiece.model; "
            "point the text encoder at a complete copy of e.g. DeepFloyd/t5-v1_1-xxl"
        )
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        raise T5LoadError(
            f"T5 tokenizer folder {path} has spiece.model but no tokenizer.json; reading it needs "
            "the protobuf package, which is missing: pip install protobuf"
        ) from None
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(spiece))
    except (OSError, RuntimeError) as exc:
        raise T5LoadError(f"{spiece} is not a readable SentencePiece model ({exc})") from None


def load_t5_tokenizer(path: str | Path) -> Any:
    """The T5 tokenizer of a local folder, as upstream loads it (`AutoTokenizer.from_pretrained`), offline.

    Works with a `tokenizer.json` or with only `spiece.model` + `tokenizer_config.json` (the DeepFloyd layout);
    either way T5's ids: sentencepiece pieces, then </s> (id 1); padding is <pad> (id 0).
    """
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    _check_sentencepiece_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise T5LoadError(f"cannot load the T5 tokenizer from {path}: {exc}") from None
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise T5LoadError(
            f"the tokenizer in {path} has no pad or eos token ({type(tokenizer).__name__}); "
            "T5 pads with <pad> and ends every prompt with </s>"
        )
    return tokenizer


class T5TextEncoder(NullCaptionSource):
    """transformers `T5EncoderModel` + `AutoTokenizer` loaded offline from a local directory.

    Matches Open-Sora 1.2's `T5Encoder`: prompts are tokenized as given (no caption cleaning; upstream's
    encode path never applies it), with special tokens (the closing </s>), padded and truncated to
    `model_max_length` (300 for STDiT3), and encoded in `dtype` (upstream uses fp32 for the XXL model).
    A prompt longer than `model_max_length` tokens is truncated with a warning, or rejected when `strict`.

    `offload` (one of OFFLOAD_MODES) gives T5-XXL's 19 GB (fp32) back to the video model after encoding: with
    "cpu" the weights are loaded into host memory, moved to `device` for each `encode` and back after it; with
    "free" they are dropped after each `encode` and reloaded from `path` by the next one. Either way the
    embeddings are the same as with "none". `release()` does the same on demand (e.g. after the last batch).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        model_max_length: int = 300,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tokenizer_path: str | Path | None = None,
        strict: bool = False,
        offload: str = "none",
    ) -> None:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"text_encoder offload={offload!r} is not allowed; allowed: {', '.join(OFFLOAD_MODES)}")
        self.offload = offload
        self.path = Path(path).expanduser()
        tok_path = self.path if tokenizer_path is None else Path(tokenizer_path).expanduser()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(
                f"T5 encoder directory not found or lacks config.json: {self.path} "
                "(expected a local copy of e.g. DeepFloyd/t5-v1_1-xxl; nothing is downloaded)"
            )
        if not tok_path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {tok_path}")
        if model_max_length < 1:
            raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
        self.model_max_length = int(model_max_length)
        self.device = torch.device(device)
        self.dtype = dtype
        self.strict = strict
        self.tokenizer = load_t5_tokenizer(tok_path)
        # "cpu" loads into host memory: the device never holds T5 while the video model and the VAE load.
        self.model: Any = self._load(torch.device("cpu") if offload == "cpu" else self.device)
        self.output_dim = int(self.model.config.d_model)

    def _load(self, device: torch.device) -> Any:
        from transformers import T5EncoderModel

        load_kwargs: dict[str, Any] = {"local_files_only": True, _dtype_kwarg(): self.dtype}
        model = T5EncoderModel.from_pretrained(str(self.path), **load_kwargs).to(device).eval()
        return model.requires_grad_(False)

    @property
    def resident(self) -> str:
        """Where the weights are now: "device" (ready to encode), "cpu" (offloaded) or "freed"."""
        if self.model is None:
            return "freed"
        where = next(self.model.parameters()).device
        return "device" if where == self.device or self.device.type == where.type == "cpu" else "cpu"

    def release(self, mode: str | None = None) -> None:
        """Give the device memory of the weights back: mode "cpu" moves them to host memory, "free" drops them
        (default: this encoder's `offload`; "none" keeps them). The next `encode` brings them back."""
        mode = self.offload if mode is None else mode
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"release mode={mode!r} is not allowed; allowed: {', '.join(OFFLOAD_MODES)}")
        if mode == "none" or self.model is None:
            return
        if mode == "cpu":
            self.model.to("cpu")
        else:
            self.model = None
            gc.collect()  # the weights must be unreachable before the allocator can hand their memory back
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _ready(self) -> Any:
        """The model on `device`, reloaded or moved back when it was released."""
        if self.model is None:
            self.model = self._load(self.device)
        elif self.resident != "device":
            self.model.to(self.device)
        return self.model

    @property
    def hidden_size(self) -> int:
        return self.output_dim

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens per prompt including the closing </s>, before truncation."""
        ids = self.tokenizer(list(prompts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    def _check_lengths(self, prompts: list[str]) -> None:
        too_long = [(i, n) for i, n in enumerate(self.token_counts(prompts)) if n > self.model_max_length]
        if not too_long:
            return
        detail = ", ".join(f"prompt {i} has {n} tokens" for i, n in too_long)
        msg = f"{detail}; the limit is {self.model_max_length} (T5 truncates the rest)"
        if self.strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        prompts = check_prompts(prompts)
        self._check_lengths(prompts)
        tokens = self.tokenizer(
            prompts,
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        input_ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device, torch.long)
        hidden = self._ready()(input_ids=input_ids, attention_mask=mask)["last_hidden_state"]
        out = {"y": hidden.detach()[:, None], "mask": mask}
        self.release()  # per `offload`; the embeddings are new tensors, they stay where they are
        return out
