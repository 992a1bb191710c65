"""`python -m duca_video.opensora`: upstream Open-Sora v1.2.0's own scripts/inference.py, end to end, cache attached.

The command a user with an Open-Sora checkout runs, with Open-Sora's own flags and an Open-Sora style config:

    python -m duca_video.opensora $OPEN_SORA_ROOT/scripts/inference.py CONFIG --prompt ... --cache duca

Upstream's script runs unmodified in a subprocess: its config parsing, its registry builds T5 (`t5`, i.e.
DeepFloyd/t5-v1_1-xxl from a Hugging Face cache folder), the VAE (`VideoAutoencoderKL`, a diffusers AutoencoderKL
folder) and STDiT3 (`STDiT3-XL/2` with `from_pretrained=` a Hugging Face model id, which upstream loads with
`STDiT3.from_pretrained(id, **size_kwargs)`), its prompt cleaning, RFLOW.sample and save_sample. The weights are
tiny and random, saved here in the layouts those loaders read, offline. Third-party packages that cannot be
installed here (torchvision, timm, xformers, ...) come from tests/upstream_stubs, visible after every installed
package (see its README); the mp4 is written by the torchvision stand-in's write_video with PyAV, lossless, so
decoding a file gives back exactly the frames upstream's save_sample wrote.
Needs $OPEN_SORA_ROOT (skipped with the reason printed otherwise).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.upstream import open_sora_root, skip_reason

ROOT = Path(__file__).resolve().parents[1]
STARTUP = ROOT / "tests" / "upstream_stubs" / "_startup"  # sitecustomize: the stand-ins, after installed packages
SNAPSHOT = "0" * 40  # a Hugging Face cache's revision folder (refs/main names it)
T5_ID = "DeepFloyd/t5-v1_1-xxl"
PROMPTS = ["a red circle moving left on a dark background", "Waves crash on a sandy beach under a cloudy sky"]
# 17 frames: fewer give upstream NaN timesteps (its timestep transform scales time by num_frames // 17).
FLAGS = ["--num-frames", "17", "--image-size", "64", "64", "--batch-size", "2"]


@pytest.fixture(scope="module")
def root() -> Path:
    found = open_sora_root()
    reason = skip_reason() if found is None else None
    if found is not None and importlib.util.find_spec("accelerate") is None:
        # Upstream's T5Embedder always passes a device_map, which transformers only accepts with accelerate.
        reason = "accelerate is not installed: Open-Sora's T5 loader needs it (pip install accelerate)"
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return found


def _hub_folder(hub: Path, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in a Hugging Face hub cache, as `from_pretrained(cache_dir=hub)` reads."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    folder = repo / "snapshots" / SNAPSHOT
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _tiny_upstream_stdit3() -> torch.nn.Module:
    """Upstream's STDiT3 at the tests' size (peaked text attention, see tests/upstream.py)."""
    from tests.upstream import import_upstream, tiny_upstream_model

    return tiny_upstream_model(import_upstream(open_sora_root()), model_max_length=16)


def _save_tiny_vae(folder: Path) -> None:
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    # Four blocks: 8x spatial downsampling, as the patch size (1, 8, 8) upstream's VideoAutoencoderKL assumes.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )
    vae.save_pretrained(folder)


# The official config's model: "STDiT3-XL/2" from a Hugging Face model id, which upstream loads with
# `STDiT3.from_pretrained(id, **kwargs)`: here a tiny STDiT3 saved in that layout in the test's hub cache.
OFFICIAL_MODEL = ("STDiT3-XL/2", "")
STDIT3_ID = "hpcai-tech/OpenSora-STDiT-v3"
# transformers 5 cannot run upstream's STDiT3.from_pretrained (its model code predates it): there a small STDiT3
# is registered by the config itself and loaded by upstream's load_checkpoint (a .pth path). Only our mmengine
# stand-in reads such a config; the real mmengine refuses code that defines functions in a config file.
REGISTERED_MODEL = (
    "STDiT3-tiny/2",
    """def _register_tiny_stdit3():
    # Upstream registers only STDiT3-XL/2 and 3B: a small STDiT3 under a name of its own, built like those and
    # loaded by upstream's load_checkpoint (a .pth path).
    from opensora.models.stdit.stdit3 import STDiT3, STDiT3Config
    from opensora.registry import MODELS
    from opensora.utils.ckpt_utils import load_checkpoint

    @MODELS.register_module("STDiT3-tiny/2", force=True)
    def build(from_pretrained=None, **kwargs):
        model = STDiT3(STDiT3Config(depth=2, hidden_size=64, patch_size=(1, 2, 2), num_heads=4, **kwargs))
        if from_pretrained is not None:
            load_checkpoint(model, from_pretrained)
        return model


_register_tiny_stdit3()
del _register_tiny_stdit3

""",
)


def _importable_without(root: Path, module: str) -> bool:
    """Whether a fresh interpreter imports `module` with neither `root` nor this process's paths added (Open-Sora
    installed into the environment, as its README does, editable or not)."""
    done = subprocess.run([sys.executable, "-I", "-c", f"import {module}"], cwd=root, capture_output=True)  # -I: no cwd
    return done.returncode == 0


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


CONFIG = """# An Open-Sora v1.2 inference config (as configs/opensora-v1-2/inference/sample.py), tiny local weights.
resolution = "240p"
aspect_ratio = "9:16"
num_frames = 51
fps = 24
frame_interval = 1
save_fps = 24
save_dir = "./samples/"
seed = 42
batch_size = 1
multi_resolution = "STDiT2"
dtype = "fp32"
condition_frame_length = 5
align = 5


{model}model = dict(type={model_type!r}, from_pretrained={stdit!r}, qk_norm=True, enable_flash_attn=False,
             enable_layernorm_kernel=False)
vae = dict(type="VideoAutoencoderKL", from_pretrained={vae!r}, micro_batch_size=4)
text_encoder = dict(type="t5", from_pretrained={t5!r}, model_max_length=16, cache_dir={hub!r}, local_files_only=True)
scheduler = dict(type="rflow", use_timestep_transform=True, num_sampling_steps=10, cfg_scale=7.0)
aes = 6.5
flow = None
"""


@pytest.fixture(scope="module")
def setup(root, tmp_path_factory) -> dict:
    from tests.helpers import build_deepfloyd_like_t5

    base = tmp_path_factory.mktemp("opensora_cli")
    hub = base / "hub"
    build_deepfloyd_like_t5(_hub_folder(hub, T5_ID))
    if _transformers_major() < 5:
        (model_type, model_code), stdit = OFFICIAL_MODEL, STDIT3_ID
        _tiny_upstream_stdit3().save_pretrained(_hub_folder(hub, STDIT3_ID))
    else:
        if importlib.util.find_spec("mmengine") is not None:
            pytest.skip(
                "transformers 5 cannot load upstream's STDiT3.from_pretrained, and the installed mmengine "
                "refuses a config that registers a small model in code"
            )
        (model_type, model_code), stdit = REGISTERED_MODEL, str(base / "stdit3_tiny.pth")
        torch.save(_tiny_upstream_stdit3().state_dict(), stdit)
    _save_tiny_vae(base / "vae")
    config = base / "tiny_sample.py"
    config.write_text(
        CONFIG.format(
            model=model_code, model_type=model_type, stdit=stdit, hub=str(hub), vae=str(base / "vae"), t5=T5_ID
        )
    )
    # Open-Sora installed as its README does (`pip install -v .`): its scripts import the installed package.
    upstream = [] if _importable_without(root, "opensora") else [str(root)]
    paths = [*upstream, str(STARTUP), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "HF_HUB_CACHE": str(hub),
        "DUCA_TEST_FRAMES": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return {"base": base, "config": config, "env": env, "root": root}


def _run(setup: dict, name: str, entry: list[str], extra: list[str] = ()) -> tuple[Path, str]:
    save_dir = setup["base"] / name
    cmd = [
        sys.executable,
        *entry,
        str(setup["config"]),
        "--prompt",
        *PROMPTS,
        *FLAGS,
        "--save-dir",
        str(save_dir),
        *extra,
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=setup["env"], cwd=setup["base"], capture_output=True, text=True, timeout=300)
    print(f"{name}: rc {done.returncode} in {time.perf_counter() - start:.1f} s")
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return save_dir, done.stderr


def _frames(path: Path) -> np.ndarray:
    """The frames upstream wrote: the copy the installed torchvision was given (see _startup), else the decoded
    file (our lossless write_video stand-in)."""
    if path.with_name(path.name + ".npy").is_file():
        return np.load(path.with_name(path.name + ".npy")).astype(np.int16)
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)


def _step_counts(stderr: str) -> dict[str, int]:
    found = re.findall(r"^\[duca-video\] .*?^steps: (\{.*?\});", stderr, flags=re.M | re.S)
    assert found, f"no cache summary in the output:\n{stderr[-3000:]}"
    return ast.literal_eval(found[-1])


@pytest.mark.slow
def test_upstream_inference_script_with_cache_end_to_end(setup):
    script = str(setup["root"] / "scripts" / "inference.py")
    videos = [f"sample_{i:04d}.mp4" for i in range(len(PROMPTS))]
    plain, _ = _run(setup, "upstream", [script])
    none, none_err = _run(setup, "none", ["-m", "duca_video.opensora", script], ["--cache", "none"])
    duca, duca_err = _run(setup, "duca", ["-m", "duca_video.opensora", script], ["--cache", "duca"])
    for folder in (plain, none, duca):
        assert sorted(p.name for p in folder.iterdir() if p.suffix != ".npy") == videos, folder
    # --cache none through our entry: the very video upstream's own script writes (lossless files, see module doc).
    ref = [_frames(none / name) for name in videos]
    for name, frames in zip(videos, ref):
        assert np.array_equal(frames, _frames(plain / name)), name
    assert "[duca-video] cache 'duca' attached to STDiT3 for RFLOW (10 steps)" in duca_err, duca_err[-3000:]
    counts = _step_counts(duca_err)
    assert sum(counts.values()) == 10 and counts.get("full", 0) >= 1, counts
    # DuCa's schedule: between full steps, aggressive (whole stack reused) and conservative (tokens recomputed).
    assert counts.get("aggressive", 0) >= 1 and counts.get("conservative", 0) >= 1, counts
    assert _step_counts(none_err) == {"full": 10}
    # Cached output: not the uncached video, but close to it (much closer than the two prompts' videos are).
    cached = [_frames(duca / name) for name in videos]
    assert all(r.shape == (17, 64, 64, 3) for r in ref)
    gap = [float(np.abs(c - r).mean()) for c, r in zip(cached, ref)]
    between = float(np.abs(ref[0] - ref[1]).mean())
    print(f"mean |duca - none| per video {gap}, between the two uncached videos {between:.2f} (of 255)")
    assert all(g > 0 for g in gap) and max(gap) < 0.1 * between, (gap, between)
