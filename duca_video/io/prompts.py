"""Prompts in, file names out: prompt files, index ranges, Open-Sora's score suffixes and output names.

Every name this module makes is one plain file name inside the save folder: no separator, no NUL or control
character, no leading dot (our temporary files start with one), never "." or "..".
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "PromptError",
    "append_scores",
    "check_prompt",
    "check_sample_name",
    "check_video_name",
    "duplicate_names",
    "load_prompt_file",
    "load_prompt_lines",
    "select_prompts",
    "video_name",
]

log = logging.getLogger(__name__)

# A file name has 255 bytes: keep room for ".latent.safetensors" (19) and the temporary-name decoration
# (".NAME.<pid>.tmp": 1 + 1 + up to 7 + 4). VBench's longest name (212 bytes) fits whole.
_MAX_NAME_BYTES = 222
# A --sample-name prefix leaves room for "_NNNNNNNN-K" within _MAX_NAME_BYTES.
_MAX_SAMPLE_NAME_BYTES = 200
# Control characters: invisible in logs and file names, and a newline would split a prompt file's line. Tab is
# harmless inside a prompt (it is replaced in file names).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BAD_IN_PROMPT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


class PromptError(ValueError):
    """Prompts, or the names made from them, are unusable; the message says which input and why."""


# Pipes and devices (`--prompt-path /dev/stdin`, a FIFO, `<(...)`) are read once per process: a second open
# would wait for a new writer that never comes.
_STREAMS: dict[str, list[tuple[int, str]]] = {}


def load_prompt_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number from 1, prompt) for every non-blank line, surrounding whitespace stripped. Lines end at
    "\n" only (as upstream's readlines), so line numbers are an editor's; a UTF-8 byte-order mark is dropped."""
    path = Path(path)
    if not path.exists():
        raise PromptError(f"prompt file {str(path)!r} does not exist")
    if path.is_dir():
        raise PromptError(f"prompt file {str(path)!r} is a folder, not a file")
    stream = not path.is_file()
    if stream and str(path) in _STREAMS:
        return _STREAMS[str(path)]
    lines = _parse_prompt_bytes(path, _read_prompt_bytes(path, stream))
    if stream:
        _STREAMS[str(path)] = lines
    return lines


def _read_prompt_bytes(path: Path, stream: bool) -> bytes:
    try:
        with open(path, "rb") as f:
            if stream and os.isatty(f.fileno()):  # reading would wait for someone to type
                raise PromptError(
                    f"prompt file {str(path)!r} is a terminal: pipe the prompts in "
                    f"(e.g. `... --prompt-path {path} < prompts.txt`) or give a file"
                )
            return f.read()
    except OSError as exc:
        raise PromptError(f"prompt file {str(path)!r} cannot be read: {exc}") from None


def _parse_prompt_bytes(path: Path, data: bytes) -> list[tuple[int, str]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PromptError(
            f"prompt file {str(path)!r} is not UTF-8 text (a binary file?): byte {exc.start} "
            f"(line {line}): {exc.reason}"
        ) from None
    lines = [(n, line.strip()) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise PromptError(f"prompt file {str(path)!r} is empty (no non-blank lines)")
    return lines


def load_prompt_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line; surrounding whitespace stripped, blank lines skipped."""
    return [prompt for _, prompt in load_prompt_lines(path)]


def check_prompt(prompt: object, where: str) -> None:
    """Raise PromptError (naming `where`, e.g. "prompt 3 (prompt file 'p.txt', line 5)") unless `prompt` is a
    non-blank string that UTF-8 can encode, without NUL or other control characters (tab is fine)."""
    if not isinstance(prompt, str):
        raise PromptError(f"{where} is a {type(prompt).__name__}, not a string")
    if not prompt.strip():
        raise PromptError(f"{where} is empty; every prompt needs some text")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(
            f"{where} cannot be encoded as UTF-8 ({exc.reason}: {prompt[exc.start : exc.end]!r} at "
            f"position {exc.start}); was the command line or the file in another encoding?"
        ) from None
    bad = _BAD_IN_PROMPT.search(prompt)
    if bad:
        what = "a NUL character" if bad.group() == "\0" else f"the control character {bad.group()!r}"
        raise PromptError(
            f"{where} contains {what} at position {bad.start()}; prompts are one line of text "
            "(use --prompt-path FILE for several)"
        )


def check_sample_name(name: str) -> None:
    """Raise PromptError unless `name` is usable as the start of a file name inside the save folder."""
    if not name:
        raise PromptError("it is empty; give a name such as 'sample' (files are NAME_0000.mp4)")
    if name in (".", "..") or "/" in name or (os.altsep and os.altsep in name) or os.sep in name:
        raise PromptError(f"{name!r} is a path; give a plain name (files are written inside --save-dir)")
    if _CONTROL.search(name):
        raise PromptError(f"{name!r} contains a NUL or control character")
    if name.startswith("."):
        raise PromptError(f"{name!r} starts with '.', which would hide the files (and marks our temporary files)")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise PromptError(f"{name!r} cannot be encoded as UTF-8") from None
    if size > _MAX_SAMPLE_NAME_BYTES:
        raise PromptError(f"it is {size} bytes long; at most {_MAX_SAMPLE_NAME_BYTES} fit a file name")


def check_video_name(name: str) -> None:
    """Raise PromptError unless `name` is one plain file name inside the save folder (the last line of defence
    for names chosen by callers, e.g. a suite's planned videos)."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise PromptError(f"video name {name!r} is not a file name")
    if "/" in name or os.sep in name or (os.altsep and os.altsep in name) or _CONTROL.search(name):
        raise PromptError(
            f"video name {name!r} holds a path separator or a control character; it must stay inside the save folder"
        )
    if name.startswith("."):
        raise PromptError(f"video name {name!r} starts with '.' (hidden, and the mark of our temporary files)")
    if len(name.encode("utf-8", errors="replace")) > _MAX_NAME_BYTES:
        raise PromptError(f"video name {name[:40]!r}... is longer than {_MAX_NAME_BYTES} bytes")


def duplicate_names(named: Sequence[tuple[int, str, str]]) -> list[str]:
    """For (prompt index, prompt, name) triples, one line per file name that several prompts would write."""
    by_name: dict[str, list[tuple[int, str]]] = {}
    for index, prompt, name in named:
        by_name.setdefault(name, []).append((index, prompt))
    return [
        f"{name!r} from " + ", ".join(f"prompt {i} ({p[:60]!r})" for i, p in sorted(set(users)))
        for name, users in by_name.items()
        if len({i for i, _ in users}) > 1
    ]


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
    stem = _CONTROL.sub("_", f"{sample_name or ''}{prompt}").replace(os.sep, "_").replace("/", "_")
    if os.altsep:
        stem = stem.replace(os.altsep, "_")
    stem = stem or "_"
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
