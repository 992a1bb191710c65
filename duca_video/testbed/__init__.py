"""A synthetic text-to-video testbed: word encoder, pixel "VAE", procedural data, adherence metrics, and the
loader of the small trained STDiT3 shipped in `weights/tiny`."""

from .adherence import adherence, color_accuracy, direction_accuracy, parse_caption, read_clips, temporal_consistency
from .data import DataConfig, SyntheticVideos
from .pixel_vae import PixelVAE
from .text import WordTextEncoder
from .tiny import TinyTestbed, load_tiny

__all__ = [
    "DataConfig",
    "PixelVAE",
    "SyntheticVideos",
    "TinyTestbed",
    "WordTextEncoder",
    "adherence",
    "color_accuracy",
    "direction_accuracy",
    "load_tiny",
    "parse_caption",
    "read_clips",
    "temporal_consistency",
]
