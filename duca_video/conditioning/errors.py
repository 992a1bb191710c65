"""Error types of image- and video-conditioned generation.

Both derive from the project's PromptError, so the CLI already reports them as `error: ...` with exit status 2.
"""

from __future__ import annotations

from duca_video.io.prompts import PromptError

__all__ = ["ConditionPromptError", "ConditioningError", "MaskStrategyError"]


class ConditioningError(PromptError):
    """A reference, a mask strategy or a loop prompt is unusable; the message says which input and why."""


class MaskStrategyError(ConditioningError):
    """A mask strategy cannot be parsed, or points outside its reference or the video."""


class ConditionPromptError(ConditioningError):
    """A prompt's inline JSON part or its loop segments (`|0|text|2|text`) are malformed."""
