"""Open-Sora 1.2 conditioned prompts: an inline JSON part and per-loop segments.

    |0|a jeep in a forest.|2|a jeep in the desert.{"reference_path": "a.png;b.mp4", "mask_strategy": "0;0,1,0,-1,1"}

As upstream: the JSON part starts at the prompt's only "{" and runs to its end; its keys (reference_path,
mask_strategy) replace the run's --reference-path / --mask-strategy for this prompt only. What stays is the text,
which holds loop segments when it starts with "|0|": segment "|k|text" is used from loop k until the next
segment's loop (the last one until the end). Reference paths are separated by ";".
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConditionPromptError
from .strategy import MaskGroup, check_reference_indices, parse_mask_strategy

__all__ = [
    "ConditionedPrompt",
    "LoopSegment",
    "parse_conditioned_prompt",
    "parse_loop_segments",
    "prompt_for_loop",
    "split_inline_json",
    "split_reference_paths",
]

JSON_KEYS = ("reference_path", "mask_strategy")
_LOOP_START = re.compile(r"\|\s*\d+\s*\|")


@dataclass(frozen=True)
class LoopSegment:
    start_loop: int  # first loop that uses this text
    text: str  # stripped, as upstream's split_prompt


@dataclass(frozen=True)
class ConditionedPrompt:
    text: str  # the prompt without its JSON part (loop segments still in it), as upstream keeps it
    segments: tuple[LoopSegment, ...] | None  # None: one text for every loop
    references: tuple[str, ...]  # reference paths (images or videos), in strategy index order
    strategy: tuple[MaskGroup, ...]

    def text_for_loop(self, loop: int) -> str:
        return self.text if self.segments is None else prompt_for_loop(self.segments, loop)


def _no_duplicates(where: str):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise ConditionPromptError(f"{where}: JSON key {key!r} is given twice")
            seen[key] = value
        return seen

    return hook


def split_inline_json(prompt: str, where: str = "prompt") -> tuple[str, dict[str, str]]:
    """(text before the JSON part, its {key: value}); no JSON part gives (prompt, {})."""
    braces = [m.start() for m in re.finditer(r"\{", prompt)]
    if not braces:
        return prompt, {}
    if len(braces) > 1:
        raise ConditionPromptError(
            f"{where}: {len(braces)} '{{' found (at characters {braces}); a prompt may end "
            'with one flat JSON part such as {"reference_path": "a.png", '
            '"mask_strategy": "0"} and have no other \'{\''
        )
    text, raw = prompt[: braces[0]], prompt[braces[0] :]
    try:
        info = json.loads(raw, object_pairs_hook=_no_duplicates(where))
    except json.JSONDecodeError as exc:
        raise ConditionPromptError(
            f"{where}: its JSON part {raw!r} is not valid JSON ({exc.msg} at character "
            f"{exc.pos}); it must be the prompt's end, with double-quoted keys and "
            "strings"
        ) from None
    for key, value in info.items():
        if key not in JSON_KEYS:
            raise ConditionPromptError(f"{where}: unknown JSON key {key!r}; allowed: {', '.join(JSON_KEYS)}")
        if not isinstance(value, str):
            raise ConditionPromptError(
                f"{where}: JSON {key!r} is {json.dumps(value)}, it must be a string "
                '(e.g. "a.png;b.mp4" or "0;0,1,0,-1,1")'
            )
    return text, info


def split_reference_paths(value: str | None, where: str = "reference path") -> tuple[str, ...]:
    """Split "a.png;b.mp4" into ("a.png", "b.mp4"); None or "" gives (). Surrounding spaces are dropped."""
    if value is None or value == "":
        return ()
    paths = tuple(part.strip() for part in value.split(";"))
    for n, path in enumerate(paths):
        if not path:
            raise ConditionPromptError(
                f"{where}: reference {n} of {value!r} is empty; separate paths with ';' and do not end with one"
            )
    return paths


def parse_loop_segments(text: str, where: str = "prompt") -> tuple[LoopSegment, ...] | None:
    """Split "|0|a|2|b" into (LoopSegment(0, "a"), LoopSegment(2, "b")); None when `text` does not start with "|0|"."""
    if not text.startswith("|0|"):
        if _LOOP_START.match(text):
            raise ConditionPromptError(
                f"{where}: loop segments must start with '|0|' (the first loop), "
                f"got {text[: _LOOP_START.match(text).end()]!r}"
            )  # type: ignore[union-attr]
        return None
    parts = text.split("|")[1:]
    if len(parts) % 2:
        raise ConditionPromptError(
            f"{where}: loop segments must be '|loop|text' pairs; the last '|' ({parts[-1]!r} after it) has no text"
        )
    segments: list[LoopSegment] = []
    for i in range(0, len(parts), 2):
        try:
            start = int(parts[i])
        except ValueError:
            raise ConditionPromptError(
                f"{where}: loop segment {i // 2} starts with {parts[i]!r}, which is not a "
                "loop index (write '|2|text', with '|' only around loop numbers)"
            ) from None
        if segments and start <= segments[-1].start_loop:
            raise ConditionPromptError(
                f"{where}: loop segment {i // 2} starts at loop {start}, after a segment "
                f"for loop {segments[-1].start_loop}; loop indices must increase"
            )
        if not parts[i + 1].strip():
            raise ConditionPromptError(f"{where}: loop segment {i // 2} (loop {start}) has no text")
        segments.append(LoopSegment(start, parts[i + 1].strip()))
    return tuple(segments)


def prompt_for_loop(segments: Sequence[LoopSegment], loop: int) -> str:
    """The text loop `loop` uses: the last segment starting at or before it (upstream's extract_prompts_loop)."""
    if loop < 0:
        raise ValueError(f"loop {loop} must be >= 0")
    return [segment.text for segment in segments if segment.start_loop <= loop][-1]


def parse_conditioned_prompt(
    prompt: str,
    reference_path: str | None = None,
    mask_strategy: str | None = None,
    loops: int = 1,
    where: str = "prompt",
) -> ConditionedPrompt:
    """Split `prompt` into text, loop segments, references and mask strategy. reference_path / mask_strategy are
    the run's defaults for this prompt (--reference-path, --mask-strategy); the prompt's JSON overrides each.
    With `loops` (--loop) the loop indices of segments and strategy groups must be < loops."""
    if loops < 1:
        raise ConditionPromptError(f"--loop {loops} must be >= 1")
    text, info = split_inline_json(prompt, where)
    paths = info.get("reference_path", reference_path)
    strategy_text = info.get("mask_strategy", mask_strategy)
    references = split_reference_paths(paths, f"{where}: reference_path")
    strategy = parse_mask_strategy(strategy_text, f"{where}: mask_strategy")
    segments = parse_loop_segments(text, where)
    late = [s.start_loop for s in segments or ()] + [g.loop for g in strategy]
    if late and max(late) >= loops:
        plural = "s" if loops != 1 else ""
        raise ConditionPromptError(
            f"{where}: it uses loop {max(late)}, but the run has {loops} loop{plural} "
            f"(0..{loops - 1}); raise --loop or drop it"
        )
    check_reference_indices(strategy, len(references), f"{where}: mask_strategy")
    return ConditionedPrompt(text, segments, references, strategy)
