"""Inputs and outputs of inference runs: prompts, crash-safe files, mp4 videos."""

from .files import (
    atomic_path,
    atomic_write_json,
    check_writable,
    is_storage_full,
    remove_stale_temps,
    save_latent,
)
from .prompts import PromptError, append_scores, load_prompt_file, select_prompts, video_name
from .records import RECORD_FIELDS, OutputPaths, RunSummary
from .video import choose_codec, to_uint8_frames, write_video

__all__ = [
    "RECORD_FIELDS",
    "OutputPaths",
    "RunSummary",
    "PromptError",
    "append_scores",
    "atomic_path",
    "atomic_write_json",
    "check_writable",
    "is_storage_full",
    "choose_codec",
    "load_prompt_file",
    "remove_stale_temps",
    "save_latent",
    "select_prompts",
    "to_uint8_frames",
    "video_name",
    "write_video",
]
