"""Open-Sora 1.2 models: STDiT3, the VAE pipeline and the text encoder."""

from .checkpoint import CheckpointMismatchError, load_checkpoint, read_state_dict
from .stdit3 import STDiT3, STDiT3Block, STDiT3Config
from .text_encoder import T5TextEncoder, TextEncoder, null_caption
from .vae import OpenSoraVAE, SpatialVAE, TemporalVAE

__all__ = [
    "CheckpointMismatchError",
    "OpenSoraVAE",
    "STDiT3",
    "STDiT3Block",
    "STDiT3Config",
    "SpatialVAE",
    "T5TextEncoder",
    "TemporalVAE",
    "TextEncoder",
    "load_checkpoint",
    "null_caption",
    "read_state_dict",
]
