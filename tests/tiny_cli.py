"""The user's command on the shipped tiny model (DuCa, two prompts in one batch of 2, latents saved), run in
process, and what it writes: for tests that compare one option's videos with the plain job's."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("sample_0000", "sample_0001")
BASE = ["--config", str(ROOT / "configs" / "tiny.py"), "--prompt", "a large red circle moving left on a dark "
        "background", "a small blue square moving up on a light background", "--batch-size", "2",
        "--num-sampling-steps", "9", "--save-latents", "--quiet"]  # fmt: skip


def run_tiny(save_dir: Path, *extra: str) -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    from inference import main

    return main([*BASE, "--save-dir", str(save_dir), *extra])


def latent(save_dir: Path, name: str) -> torch.Tensor:
    return load_file(str(save_dir / f"{name}.latent.safetensors"))["latent"]


def record(save_dir: Path, name: str) -> dict:
    return json.loads((save_dir / f"{name}.json").read_text())


def mp4_times(save_dir: Path) -> dict[str, int]:
    """Each video's modification time: unchanged when a later job counts it as complete."""
    return {p.name: p.stat().st_mtime_ns for p in save_dir.glob("*.mp4")}
