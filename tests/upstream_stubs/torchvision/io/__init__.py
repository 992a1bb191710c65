"""torchvision.io.write_video with PyAV: (T, H, W, C) uint8 frames -> a video file, torchvision's arguments.

Only writing is provided (Open-Sora's save_sample); reading videos (reference conditioning) is not. Unless the
caller's options say otherwise, H.264 is written lossless (qp 0): x264 does not always encode the same frames to
the same bytes, but lossless files decode to exactly the frames they were given, which tests compare.
"""

import av
import numpy as np
import torch

from . import video  # noqa: F401


def write_video(filename, video_array, fps, video_codec="libx264", options=None, **_audio):
    # Contiguous: save_sample hands over a permuted view, and PyAV reads a frame's buffer as laid out in memory.
    frames = np.ascontiguousarray(torch.as_tensor(video_array).to(torch.uint8).cpu().numpy())
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video stand-in: expected (T, H, W, 3) frames, got {frames.shape}")
    with av.open(str(filename), mode="w") as container:
        stream = container.add_stream(video_codec, rate=int(np.round(fps)))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.options = {"qp": "0", **dict(options or {})}
        for img in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode(None))


def read_video(*_args, **_kwargs):
    raise NotImplementedError("torchvision stand-in: read_video is not available in the tests")
