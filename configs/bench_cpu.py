# A mid-size STDiT3 for CPU latency benchmarks of the caching methods (random weights; never downloads).
#   python scripts/benchmark.py --config configs/bench_cpu.py --methods none,duca,toca,fora --json bench_cpu.json
# 256x256, 17 frames -> latent (5, 32, 32) -> 5 frames x 256 tokens; CFG doubles the batch.

image_size = (256, 256)
num_frames = 17
fps = 24
seed = 0
batch_size = 1
dtype = "fp32"

model = dict(
    type="STDiT3",
    depth=4,
    hidden_size=512,
    num_heads=8,
    patch_size=(1, 2, 2),
    in_channels=4,
    caption_channels=512,
    model_max_length=64,
)
vae = dict(type="OpenSoraVAE_V1_2")
text_encoder = dict(type="t5", model_max_length=64)
scheduler = dict(type="rflow", use_timestep_transform=True, num_sampling_steps=30, cfg_scale=7.0)
cache = dict(method="duca")
