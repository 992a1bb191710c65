"""Load the shipped tiny testbed model (`weights/tiny`) and generate clips with it.

`config.json` holds the STDiT3Config fields plus a `testbed` section (data settings, video size, fps, sampler
settings and model kwargs used in training); `STDiT3Config.from_dict` does not know that key, so it is split
off here before building the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.stdit3 import STDiT3, STDiT3Config
from ..sampling.rflow import RFlowSampler
from .data import DataConfig
from .pixel_vae import PixelVAE
from .text import WordTextEncoder

__all__ = ["DEFAULT_TINY_DIR", "TinyTestbed", "load_tiny", "read_tiny_config"]

DEFAULT_TINY_DIR = Path(__file__).resolve().parents[2] / "weights" / "tiny"


def read_tiny_config(directory: str | Path = DEFAULT_TINY_DIR) -> tuple[STDiT3Config, dict[str, Any]]:
    """(the STDiT3Config, the `testbed` section) of `directory/config.json`."""
    raw = json.loads((Path(directory) / "config.json").read_text())
    testbed = raw.pop("testbed", None)
    if testbed is None:
        raise ValueError(f"{directory}/config.json has no 'testbed' section: not a testbed model")
    return STDiT3Config.from_dict(raw), testbed


@dataclass
class TinyTestbed:
    """Everything needed to sample from the testbed model, configured as it was trained."""

    model: STDiT3
    text_encoder: WordTextEncoder
    vae: PixelVAE
    data: DataConfig
    sampler: RFlowSampler
    testbed: dict[str, Any]

    def model_kwargs(self, batch: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """fps / height / width as the model saw them in training (per-sample tensors)."""
        return {k: torch.full((batch,), float(v), device=device) for k, v in self.testbed["model_kwargs"].items()}

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int] | None = None,
        sampler: RFlowSampler | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """(B, 3, T, H, W) clips in [-1, 1]; sample i starts from noise drawn with seed `seeds[i]` (default i)."""
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        device = next(self.model.parameters()).device
        shape = (3, *self.vae.get_latent_size((self.data.num_frames, self.data.height, self.data.width)))
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
        text = self.text_encoder.encode(prompts)
        y_null = self.text_encoder.null(len(prompts), self.model).to(device)
        out = (sampler or self.sampler).sample(
            self.model,
            z,
            text["y"],
            y_null,
            text["mask"],
            model_kwargs=self.model_kwargs(len(prompts), device),
            progress=progress,
        )
        return self.vae.decode(out, num_frames=self.data.num_frames)


def load_tiny(
    directory: str | Path = DEFAULT_TINY_DIR, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> TinyTestbed:
    """Strictly load `model.safetensors`, the word encoder and the testbed settings from `directory`."""
    directory = Path(directory).expanduser()
    config, testbed = read_tiny_config(directory)
    model = STDiT3.from_pretrained(str(directory / "model.safetensors"), config=config, dtype=dtype, device=device)
    text = WordTextEncoder.from_pretrained(directory, device=device).attach(model)
    sampler = RFlowSampler(**testbed["sampler"])
    return TinyTestbed(model, text, PixelVAE().to(device), DataConfig.from_dict(testbed["data"]), sampler, testbed)
