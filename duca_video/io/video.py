"""MP4 writing with PyAV: H.264 when the installed FFmpeg has an encoder for it, else a codec it does have."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from .files import atomic_path

__all__ = ["VIDEO_CODECS", "choose_codec", "to_uint8_frames", "write_video"]

log = logging.getLogger(__name__)

# Preference order. "h264" picks whatever H.264 encoder the FFmpeg build has (libx264, openh264, ...);
# mpeg4 (part 2) is in every FFmpeg build and every player reads it.
VIDEO_CODECS = ("libx264", "h264", "mpeg4")


@functools.cache
def choose_codec() -> str:
    import av

    for name in VIDEO_CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - av raises UnknownCodecError or ValueError depending on version
            continue
        if name == "mpeg4":
            log.warning("this PyAV/FFmpeg build has no H.264 encoder; writing MPEG-4 part 2 video instead")
        return name
    raise RuntimeError(
        f"PyAV has none of the video encoders {', '.join(VIDEO_CODECS)}; reinstall PyAV (pip install av)"
    )


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 on the CPU, rounded as Open-Sora's save_sample does."""
    x = video.detach().float().clamp(-1, 1).add(1).div(2)
    return x.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).cpu()


def write_video(path: str | os.PathLike, frames: torch.Tensor, fps: int) -> str:
    """Write (T, H, W, 3) uint8 frames to `path` (atomically). Returns the codec used."""
    import av

    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {tuple(frames.shape)} {frames.dtype}")
    codec = choose_codec()
    t, h, w, _ = frames.shape
    # 4:2:0 needs even sides for x264; odd sizes (pixel-space models) keep full chroma instead of being cropped.
    pix_fmt = "yuv420p" if (h % 2 == 0 and w % 2 == 0) or codec == "mpeg4" else "yuv444p"
    array = frames.numpy()
    with atomic_path(Path(path)) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=int(fps))
            stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
            for i in range(t):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(array[i], format="rgb24")))
            container.mux(stream.encode(None))
    return codec
