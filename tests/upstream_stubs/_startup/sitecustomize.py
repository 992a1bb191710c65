"""Makes the stand-ins in tests/upstream_stubs visible to a test's subprocess, after every installed package.

A test that runs upstream's own scripts puts this folder on PYTHONPATH; Python imports `sitecustomize` at start-up.
transformers decides once, on import, which optional packages exist (torchvision, timm, peft, ...) and then
imports them for its own use; it is imported here first, so it sees the real environment, not the stand-ins
(the in-process tests do the same, see tests/upstream.py). Then the stand-ins folder is appended to sys.path, so
an installed package of the same name always wins.
"""

import os
import sys
from pathlib import Path

import transformers.modeling_utils  # noqa: F401 - its optional-package probes run before any stand-in exists

sys.path.append(str(Path(__file__).resolve().parent.parent))

# With DUCA_TEST_FRAMES set, the frames that upstream's save_sample hands to torchvision's write_video are also
# saved next to the video (NAME.mp4.npy, uint8), before the installed torchvision encodes them (lossy H.264): the
# tests compare what upstream wrote, not what the encoder made of it. The stand-in write_video is lossless and
# needs no such copy.
if os.environ.get("DUCA_TEST_FRAMES"):
    try:
        import torchvision.io as _tv_io
    except ImportError:
        _tv_io = None
    if _tv_io is not None:
        _write_video = _tv_io.write_video

        def _write_video_keeping_frames(filename, video_array, *args, **kwargs):
            import numpy

            numpy.save(f"{filename}.npy", numpy.asarray(video_array))
            return _write_video(filename, video_array, *args, **kwargs)

        _tv_io.write_video = _write_video_keeping_frames
