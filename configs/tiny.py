# The CPU job: the small pixel-space testbed model (STDiT3 on 8 frames of 16x16, word-level captions),
# seconds per video on two cores. Prompts follow the testbed grammar, e.g.
#   "a large red square moving left on a dark background"
#   python scripts/inference.py --config configs/tiny.py --prompt "a small blue circle moving up on a light background"

# The trained weights shipped in weights/tiny (model.safetensors + config.json + the word encoder), made by
# scripts/train_tiny.py. Set _weights = None for a randomly initialised model and encoder (seeded).
from pathlib import Path

_weights = str(Path(__file__).resolve().parents[1] / "weights" / "tiny")

# Architecture used for random init only (scripts/train_tiny.py's); with weights, config.json defines it.
_random_init = dict(depth=4, hidden_size=128, num_heads=4, patch_size=(4, 2, 2), pred_sigma=False, input_sq_size=64)

image_size = (16, 16)
num_frames = 8
fps = 8
save_fps = 8
seed = 42
batch_size = 4
dtype = "fp32"
device = "cpu"
save_dir = "samples/tiny"

model = dict(type="STDiT3", from_pretrained=_weights, **({} if _weights else _random_init))
vae = dict(type="PixelVAE")  # identity: latents are pixels
text_encoder = dict(type="word", from_pretrained=_weights)
# 16x16 is far below the 512x512 the timestep transform is tuned for, and 8 frames < one 17-frame chunk.
scheduler = dict(type="rflow", use_timestep_transform=False, num_sampling_steps=30, cfg_scale=4.0)
cache = dict(method="duca")
