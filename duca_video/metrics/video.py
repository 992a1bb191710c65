"""Reading videos back for evaluation (PyAV, the same library duca_video.io writes them with)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_video"]


def read_video(path: str | os.PathLike) -> torch.Tensor:
    """All frames of the first video stream as (T, H, W, 3) uint8 RGB on the CPU."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {str(path)!r} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"video {str(path)!r} has no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.error.FFmpegError as exc:
        raise ValueError(f"video {str(path)!r} cannot be decoded: {exc}") from None
    if not frames:
        raise ValueError(f"video {str(path)!r} has no frames")
    return torch.from_numpy(np.stack(frames))
