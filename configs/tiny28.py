# The deep testbed model: Open-Sora 1.2's depth (28 spatial + 28 temporal blocks) at the shipped tiny model's
# width (128), on the same clips and captions as configs/tiny.py (8 frames of 16x16, word-level captions). The
# per-block cache decisions, and methods that rank differently on a deep stack, show here; about 7x the cost of
# configs/tiny.py per step. Prompts follow the testbed grammar, e.g.
#   python scripts/inference.py --config configs/tiny28.py --prompt "a small blue circle moving up on a dark background"

# The trained weights shipped in weights/tiny28 (model.safetensors as int8 rows + scales, read back as float32;
# config.json; the word encoder), made by scripts/train_tiny.py from weights/tiny: its blocks repeated to 28
# (duca_video/testbed/grow.py), then distilled from it (docs/benchmarks.md says how and what it scores).
# Set _weights = None for a randomly initialised model and encoder (seeded).
from pathlib import Path

_weights = str(Path(__file__).resolve().parents[1] / "weights" / "tiny28")

# Architecture used for random init only (scripts/train_tiny.py's); with weights, config.json defines it.
_random_init = dict(depth=28, hidden_size=128, num_heads=4, patch_size=(4, 2, 2), pred_sigma=False, input_sq_size=64)

image_size = (16, 16)
num_frames = 8
fps = 8
save_fps = 8
seed = 42
batch_size = 4
dtype = "fp32"
device = "cpu"
save_dir = "samples/tiny28"

model = dict(type="STDiT3", from_pretrained=_weights, **({} if _weights else _random_init))
vae = dict(type="PixelVAE")  # identity: latents are pixels
text_encoder = dict(type="word", from_pretrained=_weights)
# 16x16 is far below the 512x512 the timestep transform is tuned for, and 8 frames < one 17-frame chunk.
scheduler = dict(type="rflow", use_timestep_transform=False, num_sampling_steps=30, cfg_scale=4.0)
cache = dict(method="duca")
