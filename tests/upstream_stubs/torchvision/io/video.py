"""torchvision.io.video: the private helpers Open-Sora's read_video.py imports; reading is not provided."""


def _unavailable(*_args, **_kwargs):
    raise NotImplementedError("torchvision stand-in: video reading is not available in the tests")


_align_audio_frames = _check_av_available = _log_api_usage_once = _read_from_stream = _unavailable
_video_opt = None
