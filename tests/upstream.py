"""Upstream Open-Sora v1.2.0, imported from a checkout for tests: `$OPEN_SORA_ROOT` names its root.

Only upstream's own model, sampler, registry and sequence-parallel modules are imported. Its package
`__init__` files for `opensora.models` and `opensora.models.stdit` import every model family (and with them
torchvision, CLIP, the VAEs, ...), so those two packages are entered as bare namespaces over upstream's own
folders: the modules imported from them are upstream's files, unchanged. Missing third-party packages come
from `tests/upstream_stubs` (see its README): they are visible only while upstream's modules are imported
(after every installed package on `sys.path`), then dropped from `sys.modules`, so the rest of the test process
never mistakes them for installed packages (transformers probes for e.g. timm). Upstream's checkpoint
helpers (`opensora.utils.ckpt_utils`: ColossalAI's booster, peft, torchvision downloads) are not under test
and are replaced by a module whose `load_checkpoint` refuses: the tests build their weights in memory.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

STUBS = Path(__file__).resolve().parent / "upstream_stubs"
RELEASE = "v1.2.0"


def open_sora_root() -> Path | None:
    value = os.environ.get("OPEN_SORA_ROOT")
    if not value:
        return None
    root = Path(value).resolve()
    return root if (root / "opensora" / "models" / "stdit" / "stdit3.py").is_file() else None


def skip_reason() -> str:
    value = os.environ.get("OPEN_SORA_ROOT")
    if not value:
        return f"OPEN_SORA_ROOT not set: point it at an Open-Sora {RELEASE} checkout to run the upstream tests"
    return f"OPEN_SORA_ROOT={value} has no opensora/models/stdit/stdit3.py (an Open-Sora {RELEASE} checkout?)"


@dataclass
class Upstream:
    root: Path
    stdit3: types.ModuleType  # opensora.models.stdit.stdit3 (STDiT3, STDiT3Config, STDiT3Block)
    rf: types.ModuleType  # opensora.schedulers.rf (RFLOW)
    parallel_states: types.ModuleType
    communications: types.ModuleType
    registry: types.ModuleType
    config_utils: types.ModuleType  # parse_configs: upstream's command line and config file


def _namespace(name: str, folder: Path) -> None:
    if name in sys.modules:
        return
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)


@contextmanager
def _stubs_visible() -> Iterator[None]:
    """Stand-ins importable inside the block only; modules that imported them keep their references."""
    import transformers.modeling_utils  # noqa: F401 - probes optional packages once, before any stand-in exists

    before = set(sys.modules)
    sys.path.append(str(STUBS))
    try:
        yield
    finally:
        sys.path.remove(str(STUBS))
        for name in set(sys.modules) - before:
            if (getattr(sys.modules[name], "__file__", None) or "").startswith(str(STUBS)):
                del sys.modules[name]


def _refuse_checkpoint(*_args, **_kwargs):
    raise RuntimeError("tests/upstream.py: upstream's checkpoint loading is not available in the tests")


def _package_dir(root: Path, top: types.ModuleType) -> Path:
    """Where `opensora` was imported from: the checkout itself (`pip install -e .`, or nothing installed), or
    the copy that Open-Sora's README install (`pip install -v .`) put in site-packages, which must be v1.2.0."""
    package = Path(top.__file__).resolve().parent
    if package == root / "opensora":
        return package
    try:
        version = importlib.metadata.version("opensora")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version != RELEASE.lstrip("v"):
        raise RuntimeError(
            f"`opensora` resolves to {top.__file__} (installed version {version}), neither "
            f"OPEN_SORA_ROOT={root} nor an installed Open-Sora {RELEASE}"
        )
    return package


def import_upstream(root: Path) -> Upstream:
    if str(root) not in sys.path:
        sys.path.append(str(root))  # appended: this repo's own `tests` package stays first
    package = _package_dir(root, importlib.import_module("opensora"))
    _namespace("opensora.models", package / "models")
    _namespace("opensora.models.stdit", package / "models" / "stdit")
    if "opensora.utils.ckpt_utils" not in sys.modules:
        importlib.import_module("opensora.utils")
        ckpt = types.ModuleType("opensora.utils.ckpt_utils")
        ckpt.load_checkpoint = _refuse_checkpoint
        sys.modules[ckpt.__name__] = ckpt
    with _stubs_visible():
        return Upstream(
            root=root,
            stdit3=importlib.import_module("opensora.models.stdit.stdit3"),
            rf=importlib.import_module("opensora.schedulers.rf"),
            parallel_states=importlib.import_module("opensora.acceleration.parallel_states"),
            communications=importlib.import_module("opensora.acceleration.communications"),
            registry=importlib.import_module("opensora.registry"),
            config_utils=importlib.import_module("opensora.utils.config_utils"),
        )


def upstream_or_skip() -> Upstream:
    root = open_sora_root()
    if root is None:
        reason = skip_reason()
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return import_upstream(root)


# -- tiny upstream models and inputs, shared by the tests and the multi-process worker ------------------------

TINY = dict(
    depth=2, hidden_size=64, num_heads=4, patch_size=(1, 2, 2), in_channels=4, caption_channels=32, model_max_length=8
)
# Token methods with their test overrides: PAB's window covers every step, TeaCache skips some steps.
METHODS = {
    "none": {},
    "duca": {},
    "toca": {},
    "fora": {},
    "aggressive": {},
    "conservative": {},
    "pab": {"threshold": (0.0, 2000.0)},
    "teacache": {"threshold": 0.3},
    "duca_forecast": {},
    "taylorseer": {"interval": 3, "warmup_steps": 1},
    "magcache": {"retention_ratio": 0.1},
    "fbcache": {"threshold": 0.3},
    "fastercache": {"attn_start": 2, "cfg_start": 3},
    "easycache": {"threshold": 0.05, "warmup_steps": 2},
}


def tiny_upstream_model(up: Upstream, seed: int = 0, **config) -> torch.nn.Module:
    """Upstream's STDiT3 at a tiny size with random weights (its zero-initialised parts included)."""
    torch.manual_seed(seed)
    model = up.stdit3.STDiT3(up.stdit3.STDiT3Config(**{**TINY, **config})).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    for block in [*model.spatial_blocks, *model.temporal_blocks]:  # peaked text attention: entropy scores differ
        block.cross_attn.q_linear.weight.data.normal_(0, 1.0)
        block.cross_attn.kv_linear.weight.data.normal_(0, 1.0)
    return model


class FixedTextEncoder:
    """What upstream's RFLOW.sample asks of a text encoder (`encode`, `null`), for given caption embeddings."""

    def __init__(self, model: torch.nn.Module, y: torch.Tensor, mask: torch.Tensor) -> None:
        self.model, self.y, self.mask = model, y, mask

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        assert len(prompts) == self.y.shape[0]
        return {"y": self.y, "mask": self.mask}

    def null(self, n: int) -> torch.Tensor:  # upstream's T5Encoder.null: the model's null caption
        return self.model.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]


def tiny_inputs(seed: int = 1, batch: int = 2, frames: int = 34) -> dict:
    """Latent noise (B, 4, 3, 8, 10) -> a 4x5 patch grid (S = 20, splits over 2 ranks), captions of different
    lengths, and Open-Sora's size arguments (the timestep transform uses them)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 8, dtype=torch.long)
    for i in range(batch):
        mask[i, : 3 + 4 * (i % 2)] = 1
    extra = {
        "height": torch.full((batch,), 64.0),
        "width": torch.full((batch,), 80.0),
        "num_frames": torch.full((batch,), float(frames)),
        "fps": torch.full((batch,), 24.0),
    }
    return {
        "z": torch.randn(batch, 4, 3, 8, 10, generator=g),
        "y": torch.randn(batch, 1, 8, 32, generator=g),
        "mask": mask,
        "extra": extra,
    }


def upstream_rflow(up: Upstream, steps: int = 10):
    return up.rf.RFLOW(num_sampling_steps=steps, cfg_scale=4.0, use_timestep_transform=True)


def sample_upstream(rflow, model: torch.nn.Module, data: dict) -> torch.Tensor:
    """Upstream's own sampling loop, as its scripts/inference.py calls it."""
    encoder = FixedTextEncoder(model, data["y"], data["mask"])
    prompts = [f"prompt {i}" for i in range(data["z"].shape[0])]
    with torch.no_grad():
        return rflow.sample(
            model,
            encoder,
            z=data["z"].clone(),
            prompts=prompts,
            device=data["z"].device,
            additional_args=dict(data["extra"]),
            progress=False,
        )


def sample_ours(model: torch.nn.Module, data: dict, steps: int = 10, seed: int = 0) -> torch.Tensor:
    """Our RFlowSampler with the same settings as `upstream_rflow`."""
    from duca_video.sampling.rflow import RFlowSampler

    sampler = RFlowSampler(num_sampling_steps=steps, cfg_scale=4.0, use_timestep_transform=True)
    y_null = model.y_embedder.y_embedding[None, None].expand_as(data["y"])
    return sampler.sample(
        model, data["z"].clone(), data["y"], y_null, data["mask"], model_kwargs=data["extra"], progress=False, seed=seed
    )
