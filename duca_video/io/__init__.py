"""Inputs and outputs of inference runs: prompts, crash-safe files, mp4 videos, reference media (a job's
bookkeeping: `duca_video.jobs`)."""

from .files import (
    atomic_path,
    atomic_write_json,
    check_writable,
    file_digest,
    is_storage_full,
    remove_stale_temps,
    save_latent,
)
from .prompts import PromptError, append_scores, load_prompt_file, select_prompts, video_name
from .video import choose_codec, to_uint8_frames, write_video

__all__ = [
    "PromptError",
    "append_scores",
    "atomic_path",
    "atomic_write_json",
    "check_writable",
    "file_digest",
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
