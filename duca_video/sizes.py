"""Video sizes as Open-Sora 1.2 names them: resolution x aspect ratio -> (H, W), and frame counts.

The (H, W) tables are Open-Sora 1.2's (``opensora/datasets/aspect.py`` at v1.2.0). They are not all what the
formula in that file gives (240p 2:3 is 262x393, 480p 4:3 is 740x555): upstream edited them by hand, and the
model was trained on these exact sizes, so they are listed rather than computed.
"""

from __future__ import annotations

# Aspect ratios are height:width, in upstream's order (tallest first).
ASPECT_RATIOS: tuple[str, ...] = (
    "3:8",
    "9:21",
    "12:25",
    "1:2",
    "9:17",
    "27:50",
    "9:16",
    "5:8",
    "2:3",
    "3:4",
    "1:1",
    "4:3",
    "3:2",
    "16:9",
    "17:9",
    "2:1",
    "50:27",
)

# One (H, W) per entry of ASPECT_RATIOS, in the same order.
_SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "144p": (
        (117, 312),
        (125, 291),
        (133, 277),
        (135, 270),
        (139, 262),
        (141, 260),
        (144, 256),
        (151, 241),
        (156, 234),
        (166, 221),
        (192, 192),
        (221, 165),
        (235, 156),
        (256, 144),
        (263, 139),
        (271, 135),
        (277, 132),
    ),
    "240p": (
        (196, 522),
        (210, 490),
        (222, 462),
        (226, 452),
        (232, 438),
        (236, 436),
        (240, 426),
        (252, 404),
        (262, 393),
        (276, 368),
        (320, 320),
        (370, 278),
        (392, 262),
        (426, 240),
        (440, 232),
        (452, 226),
        (462, 222),
    ),
    "360p": (
        (294, 784),
        (314, 732),
        (332, 692),
        (340, 680),
        (350, 662),
        (352, 652),
        (360, 640),
        (380, 608),
        (392, 588),
        (416, 554),
        (480, 480),
        (554, 416),
        (588, 392),
        (640, 360),
        (660, 350),
        (678, 340),
        (692, 332),
    ),
    "480p": (
        (392, 1046),
        (420, 980),
        (444, 925),
        (452, 904),
        (466, 880),
        (470, 870),
        (480, 854),
        (506, 810),
        (522, 784),
        (554, 738),
        (640, 640),
        (740, 555),
        (784, 522),
        (854, 480),
        (880, 466),
        (906, 454),
        (924, 444),
    ),
    "720p": (
        (588, 1568),
        (628, 1466),
        (666, 1388),
        (678, 1356),
        (698, 1318),
        (706, 1306),
        (720, 1280),
        (758, 1212),
        (784, 1176),
        (832, 1110),
        (960, 960),
        (1108, 832),
        (1176, 784),
        (1280, 720),
        (1320, 698),
        (1358, 680),
        (1386, 666),
    ),
}

RESOLUTION_TABLES: dict[str, dict[str, tuple[int, int]]] = {
    res: dict(zip(ASPECT_RATIOS, sizes)) for res, sizes in _SIZES.items()
}
RESOLUTIONS: tuple[str, ...] = tuple(RESOLUTION_TABLES)

# Upstream's named lengths: "Ns" is N seconds at 24 fps after the model's 17-frame chunking (2s = 3 chunks).
NUM_FRAMES_NAMES: dict[str, int] = {
    "2s": 51,
    "4s": 102,
    "8s": 204,
    "16s": 408,
    "32s": 816,
    "1x": 51,
    "2x": 102,
    "4x": 204,
    "8x": 408,
    "16x": 816,
}

# The RFlow timestep transform scales by sqrt(num_frames // 17 * 5), which is 0 for 2..16 frames.
MIN_VIDEO_FRAMES = 17


def image_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(H, W) of an Open-Sora 1.2 resolution name ("480p") and aspect ratio ("9:16")."""
    if resolution not in RESOLUTION_TABLES:
        raise ValueError(f"resolution {resolution!r} is not in the table; allowed: {', '.join(RESOLUTIONS)}")
    table = RESOLUTION_TABLES[resolution]
    if aspect_ratio not in table:
        raise ValueError(f"aspect_ratio {aspect_ratio!r} is not in the table; allowed: {', '.join(ASPECT_RATIOS)}")
    return table[aspect_ratio]


def parse_num_frames(value: int | str) -> int:
    """A frame count given as frames (51, "51") or as upstream's duration names ("2s" = 51, "4s" = 102, ...)."""
    if isinstance(value, bool):
        raise ValueError(f"num_frames must be a frame count or a duration name, got {value!r}")
    if isinstance(value, int):
        frames = value
    else:
        text = str(value).strip().lower()
        if text in NUM_FRAMES_NAMES:
            return NUM_FRAMES_NAMES[text]
        try:
            frames = int(text)
        except ValueError:
            names = ", ".join(f"{k}={v}" for k, v in NUM_FRAMES_NAMES.items() if k.endswith("s"))
            raise ValueError(f"num_frames {value!r} is neither a frame count nor one of {names}") from None
    if frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {frames}")
    return frames


def check_num_frames(num_frames: int, timestep_transform: bool) -> None:
    """Reject frame counts the sampler cannot handle: the timestep transform needs 1 (an image) or >= 17."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if timestep_transform and 1 < num_frames < MIN_VIDEO_FRAMES:
        raise ValueError(
            f"num_frames={num_frames} is not valid with the timestep transform (the VAE compresses 17-frame chunks "
            f"and the transform scales by num_frames // 17 * 5, which is 0 here): use 1 (an image) or >= "
            f"{MIN_VIDEO_FRAMES} frames, e.g. 51 (2s), 102 (4s), 204 (8s), 408 (16s); or set "
            "scheduler.use_timestep_transform=False"
        )
