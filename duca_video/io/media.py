"""Reference images and videos for conditioned generation: probe them cheaply, read them as Open-Sora does.

Open-Sora 1.2 reads references with its `resize_crop` transform: scale the picture so that it covers the target
(H, W) keeping its aspect ratio, then cut the centre. Images are resized with PIL's bicubic filter, videos with
bilinear interpolation (align_corners=False) on float frames in [0, 1]; every frame of a video is read. Both end
in [-1, 1], shape (3, T, H, W) (T = 1 for an image). Pillow reads images and PyAV (`av`) reads videos; each is
imported only when a file of its kind is used, and its absence is an error that names the package to install.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .prompts import PromptError

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "MediaError", "MediaInfo", "probe_media", "read_media"]

log = logging.getLogger(__name__)

# Upstream's lists (torchvision's image extensions; opensora.datasets.utils.VID_EXTENSIONS).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")


class MediaError(PromptError):
    """A reference file is missing, of an unknown kind, or unreadable; the message names the file."""


@dataclass(frozen=True)
class MediaInfo:
    path: str
    kind: str  # "image" or "video"
    frames: int
    height: int
    width: int


def _kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    raise MediaError(
        f"reference {path!r}: unknown file type {ext or '(no extension)'!r}; allowed: images "
        f"{', '.join(IMAGE_EXTENSIONS)}; videos {', '.join(VIDEO_EXTENSIONS)}"
    )


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise MediaError("image references need Pillow, which is not installed: pip install pillow") from None
    return Image


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise MediaError("video references need PyAV, which is not installed: pip install av") from None
    return av


def _check_file(path: str) -> Path:
    p = Path(path).expanduser()
    if path.startswith(("http://", "https://", "ftp://")):
        raise MediaError(f"reference {path!r}: URLs are not downloaded; save the file and pass its local path")
    if not p.exists():
        raise MediaError(f"reference {path!r} does not exist")
    if not p.is_file():
        raise MediaError(f"reference {path!r} is not a file")
    return p


def probe_media(path: str) -> MediaInfo:
    """Kind, frame count and size of a reference, read without decoding pixels where the container says them
    (else by decoding). Raises MediaError naming the file when it cannot be used."""
    kind = _kind(path)
    p = _check_file(path)
    if kind == "image":
        Image = _pil()
        try:
            with Image.open(p) as img:
                img.verify()  # header + structure, no full decode
                width, height = img.size
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
            raise MediaError(f"reference {path!r} cannot be read as an image: {exc}") from None
        return MediaInfo(path, "image", 1, height, width)
    av = _av()
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise MediaError(f"reference {path!r} has no video stream")
            stream = container.streams.video[0]
            width, height, frames = stream.codec_context.width, stream.codec_context.height, stream.frames
            if not frames:  # some containers do not record the count: decode to count
                frames = sum(1 for _ in container.decode(stream))
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - av raises its own error types per FFmpeg failure
        raise MediaError(f"reference {path!r} cannot be read as a video: {exc}") from None
    if frames < 1:
        raise MediaError(f"reference {path!r} has no video frames")
    return MediaInfo(path, "video", int(frames), int(height), int(width))


def _cover(h: int, w: int, th: int, tw: int, round_offset: bool) -> tuple[int, int, int, int]:
    """Upstream's resize_crop_to_fill: (resized H, W, crop top, crop left). The side whose scale is larger is
    fitted exactly, the other is rounded and cut in the middle. Upstream's image version rounds that offset,
    its video version (`int(round(s - t) / 2.0)`) rounds it down: `round_offset` picks which."""
    rh, rw = th / h, tw / w
    half = (lambda d: int(round(d / 2.0))) if round_offset else (lambda d: int(d / 2.0))
    if rh > rw:
        sw = round(w * rh)
        return th, sw, 0, half(sw - tw)
    sh = round(h * rw)
    return sh, tw, half(sh - th), 0


_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes for 16-bit (and 32-bit int) images


def _rgb8(img: Any, p: Path) -> Any:
    """The image as 8-bit RGB, as torchvision's pil_loader (`convert("RGB")`) for 8-bit modes. PIL's conversion
    of a 16-bit grey image clips each value at 255 (a 50% grey becomes white): those are scaled from 16 bits."""
    import numpy as np

    if img.mode == "F":
        raise MediaError(
            f"reference {str(p)!r} is a 32-bit floating-point image, whose value range is not known; "
            "save it with 8 or 16 bits per channel"
        )
    if img.mode not in _WIDE_INT_MODES:
        return img.convert("RGB")
    values = np.asarray(img).astype(np.int64)
    if values.min() < 0 or values.max() > 65535:
        raise MediaError(
            f"reference {str(p)!r} has values outside 0..65535 (mode {img.mode}); save it with 8 or 16 bits per channel"
        )
    grey = np.round(values * (255.0 / 65535.0)).astype(np.uint8)
    return _pil().fromarray(grey).convert("RGB")  # uint8 (H, W): mode L


def _read_image(p: Path, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    import numpy as np

    Image = _pil()
    with Image.open(p) as img:
        img = _rgb8(img, p)
        w, h = img.size
        th, tw = size
        sh, sw, i, j = _cover(h, w, th, tw, round_offset=True)
        arr = np.asarray(img.resize((sw, sh), Image.BICUBIC))[i : i + th, j : j + tw]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)  # (3, H, W)
    return x[:, None], (h, w), (sh, sw)


def _read_video(p: Path, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    import numpy as np
    import torch.nn.functional as F

    av = _av()
    with av.open(str(p)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise MediaError(f"reference {str(p)!r} has no video frames")
    clip = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255)  # (T, 3, H, W)
    h, w = clip.shape[-2:]
    th, tw = size
    sh, sw, i, j = _cover(h, w, th, tw, round_offset=False)
    clip = F.interpolate(clip, size=(sh, sw), mode="bilinear", align_corners=False)
    return clip[:, :, i : i + th, j : j + tw].permute(1, 0, 2, 3), (h, w), (sh, sw)


def read_media(path: str, size: tuple[int, int]) -> torch.Tensor:
    """The reference at `path` as (3, T, H, W) float32 in [-1, 1], resized and centre-cropped to `size` = (H, W)
    with Open-Sora's resize_crop (logged when the file's size differs)."""
    kind = _kind(path)
    p = _check_file(path)
    try:
        x, (h, w), (sh, sw) = (_read_image if kind == "image" else _read_video)(p, tuple(size))
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoding errors of either library
        raise MediaError(
            f"reference {path!r} cannot be read as {'an image' if kind == 'image' else 'a video'}: {exc}"
        ) from None
    if (h, w) != tuple(size):
        log.info(
            "reference %s: %s of %dx%d (HxW) resized to %dx%d and centre-cropped to %dx%d, as Open-Sora's "
            "resize_crop does",
            path,
            kind,
            h,
            w,
            sh,
            sw,
            size[0],
            size[1],
        )
    return x.mul(2).sub(1).contiguous()
