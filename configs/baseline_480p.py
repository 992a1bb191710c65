# Open-Sora 1.2 text-to-video at 480p 9:16, 2 s (51 frames) without caching: the reference for cached runs.
# Field names are Open-Sora 1.2's (configs/opensora-v1-2/inference/sample.py); every CLI flag overrides one.
#   python scripts/inference.py --config configs/baseline_480p.py --prompt "a red panda eating bamboo"
#
# Weights are local paths (nothing is downloaded). Give them here, with flags, or with environment variables:
#   model         hpcai-tech/OpenSora-STDiT-v3         --ckpt-path          DUCA_CKPT_PATH
#   vae           hpcai-tech/OpenSora-VAE-v1.2         --vae-path           DUCA_VAE_PATH
#   text_encoder  DeepFloyd/t5-v1_1-xxl                --text-encoder-path  DUCA_T5_PATH

resolution = "480p"
aspect_ratio = "9:16"
num_frames = 51  # or "2s"; 4s = 102, 8s = 204, 16s = 408
fps = 24
save_fps = 24
seed = 42
batch_size = 1
dtype = "bf16"
aes = 6.5  # appended to every prompt as " aesthetic score: 6.5.", as upstream
save_dir = "samples/baseline_480p"

model = dict(type="STDiT3-XL/2", from_pretrained=None)
vae = dict(type="OpenSoraVAE_V1_2", from_pretrained=None, micro_frame_size=17, micro_batch_size=4)
text_encoder = dict(type="t5", from_pretrained=None, model_max_length=300)
scheduler = dict(type="rflow", use_timestep_transform=True, num_sampling_steps=30, cfg_scale=7.0)

cache = dict(method="none")
