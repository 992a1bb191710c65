"""Image- and video-conditioned generation (Open-Sora 1.2's reference_path, mask_strategy and loop prompts)."""

from .errors import ConditioningError, ConditionPromptError, MaskStrategyError
from .prompts import ConditionedPrompt, LoopSegment, parse_conditioned_prompt, parse_loop_segments, prompt_for_loop
from .strategy import FramePlan, MaskGroup, Placement, loop_condition_group, parse_mask_strategy, plan_frames

__all__ = [
    "ConditionPromptError",
    "ConditionedPrompt",
    "ConditioningError",
    "FramePlan",
    "LoopSegment",
    "MaskGroup",
    "MaskStrategyError",
    "Placement",
    "loop_condition_group",
    "parse_conditioned_prompt",
    "parse_loop_segments",
    "parse_mask_strategy",
    "plan_frames",
    "prompt_for_loop",
]
