"""torchvision, for Open-Sora's inference imports: PIL image loading and the PyAV mp4 writer (see io)."""

from . import datasets, io, models, transforms, utils  # noqa: F401 - upstream reaches them as attributes


def get_video_backend() -> str:
    return "pyav"
