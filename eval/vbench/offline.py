"""The files VBench 0.1.5 reads when it runs offline (score.py --local), and which of them are not here.

Three caches (standard library only, nothing imported from torch or transformers):
- $VBENCH_CACHE_DIR (default ~/.cache/vbench): the checkpoints of protocol.LOCAL_FILES;
- torch hub's checkpoints, $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints): DINO's weights,
  which DINO's hubconf loads by URL whatever path VBench passes (protocol.TORCH_HUB_FILES);
- the Hugging Face cache (transformers 4.33: $TRANSFORMERS_CACHE, else $HF_HUB_CACHE / $HUGGINGFACE_HUB_CACHE,
  else $HF_HOME/hub, default ~/.cache/huggingface/hub): bert-base-uncased (protocol.HF_MODELS).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from eval.vbench.protocol import HF_MODELS, LOCAL_FILES, TORCH_HUB_FILES

__all__ = ["cache_dir", "hf_hub_cache", "missing_offline_files", "torch_hub_checkpoints"]

# scene loads BertModel's weights too; the GRiT dimensions only the tokenizer.
_NEEDS_BERT_WEIGHTS = ("scene",)


def _xdg_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def cache_dir() -> Path:
    return Path(os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench")


def torch_hub_checkpoints() -> Path:
    return Path(os.environ.get("TORCH_HOME") or _xdg_cache() / "torch") / "hub" / "checkpoints"


def hf_hub_cache() -> Path:
    for var in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(os.environ.get("HF_HOME") or _xdg_cache() / "huggingface") / "hub"


def _missing_hf(model: str, weights: bool) -> list[str]:
    """What of a cached Hugging Face model an offline from_pretrained would not find (refs/main -> snapshot)."""
    root = hf_hub_cache() / f"models--{model.replace('/', '--')}"
    try:
        snapshot = root / "snapshots" / (root / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        return [f"{root} ({model} in the Hugging Face cache)"]
    missing = [str(snapshot / f) for f in ("config.json", "vocab.txt") if not (snapshot / f).exists()]
    if weights and not any((snapshot / f).exists() for f in ("model.safetensors", "pytorch_model.bin")):
        missing.append(str(snapshot / "pytorch_model.bin (or model.safetensors)"))
    return missing


def missing_offline_files(dimensions: Sequence[str]) -> list[str]:
    """Every file the given dimensions read offline that is not in its cache, sorted."""
    root, hub = cache_dir(), torch_hub_checkpoints()
    missing = {str(root / f) for d in dimensions for f in LOCAL_FILES[d] if not (root / f).exists()}
    missing |= {str(hub / f) for d in dimensions for f in TORCH_HUB_FILES.get(d, ()) if not (hub / f).exists()}
    for model in sorted({m for d in dimensions for m in HF_MODELS.get(d, ())}):
        weights = any(d in _NEEDS_BERT_WEIGHTS and model in HF_MODELS[d] for d in dimensions)
        missing.update(_missing_hf(model, weights))
    return sorted(missing)
