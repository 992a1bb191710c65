"""Prompts in, file names out: prompt files, index ranges, Open-Sora's score suffixes and output names."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PromptError", "append_scores", "load_prompt_file", "select_prompts", "video_name"]

log = logging.getLogger(__name__)

# A file name has 255 bytes: keep room for ".latent.safetensors" (19) and the temporary-name decoration
# (".NAME.<pid>.tmp": 1 + 1 + up to 7 + 4). VBench's longest name (212 bytes) fits whole.
_MAX_NAME_BYTES = 222


class PromptError(ValueError):
    """Prompts cannot be read or selected; the message says which input and why."""


def load_prompt_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line; surrounding whitespace stripped, blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"prompt file {str(path)!r} cannot be read: {exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"prompt file {str(path)!r} is empty (no non-blank lines)")
    return prompts


def select_prompts(prompts: Sequence[str], start: int, end: int | None, source: str) -> list[tuple[int, str]]:
    """(index, prompt) for prompts[start:end]; indices count prompts (blank lines excluded), from 0."""
    if not prompts:
        raise PromptError(f"{source} holds no prompts")
    if start >= len(prompts):
        raise PromptError(
            f"--start-index {start} is past the end: {source} has {len(prompts)} prompt(s), "
            f"indices 0..{len(prompts) - 1}"
        )
    stop = len(prompts) if end is None else min(end, len(prompts))
    return [(i, prompts[i]) for i in range(start, stop)]


def append_scores(prompt: str, aes: float | None = None, flow: float | None = None, camera: str | None = None) -> str:
    """Open-Sora 1.2's conditioning suffixes, skipped when the prompt already states them."""
    if aes is not None and "aesthetic score:" not in prompt:
        prompt = f"{prompt} aesthetic score: {aes:.1f}."
    if flow is not None and "motion score:" not in prompt:
        prompt = f"{prompt} motion score: {flow:.1f}."
    if camera is not None and "camera motion:" not in prompt:
        prompt = f"{prompt} camera motion: {camera}."
    return prompt


def video_name(
    index: int, prompt: str, k: int, num_sample: int, prompt_as_path: bool, sample_name: str | None = None
) -> str:
    """Open-Sora's naming: `sample_0007` (`-k` appended when num_sample > 1); with prompt_as_path VBench's
    `{prompt}-{k}`, always with the sample index."""
    if not prompt_as_path:
        name = f"{'sample' if sample_name is None else sample_name}_{index:04d}"
        return name if num_sample == 1 else f"{name}-{k}"
    stem = f"{sample_name or ''}{prompt}".replace(os.sep, "_").replace("\0", "_")
    if os.altsep:
        stem = stem.replace(os.altsep, "_")
    suffix = f"-{k}"
    if len(stem.encode()) + len(suffix) > _MAX_NAME_BYTES:
        # Keep names unique and stable: a readable prefix plus a hash of the whole prompt.
        digest = hashlib.sha1(prompt.encode()).hexdigest()[:10]
        cut = stem.encode()[: _MAX_NAME_BYTES - len(suffix) - len(digest) - 1].decode(errors="ignore")
        stem = f"{cut}~{digest}"
        log.warning("prompt %d is too long for a file name; saving it as %r", index, stem + suffix)
    if stem.startswith("."):  # a leading dot would hide the file (and look like our temporary files)
        stem = "_" + stem[1:]
    return stem + suffix
