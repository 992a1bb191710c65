"""Safe, strict checkpoint loading.

Accepted: a `.safetensors` file, a `.pt`/`.pth`/`.bin` file (read with `weights_only=True`, so no arbitrary
object is ever unpickled), or an HF-style directory (`config.json` + `model.safetensors`, sharded
`*.safetensors.index.json`, or `pytorch_model.bin`). A weights file's architecture is the `config.json` of its
folder, whether the path names the folder or the file. Weights stored as int8 rows with scales
(`int8_rows.py`) are read back as float32. Loading is strict: one error lists every missing,
unexpected and mis-shaped key. A file that cannot be read (truncated, corrupt, not JSON) is a CheckpointError
naming it; `check_checkpoint` finds most of those from the headers alone, before any weight is read.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from duca_video.compat import is_truncated_pickle

from .int8_rows import dequantize_rows

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Wrappers that training scripts put around a state dict.
_NESTED_KEYS = ("state_dict", "model", "module", "ema")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


class CheckpointError(ValueError):
    """A checkpoint file or its config.json cannot be read (truncated, corrupt, wrong format); names the file."""


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def weights_file(path: str | Path) -> list[Path]:
    """The weight file(s) behind `path` (a file, or an HF-style directory)."""
    path = _require(Path(path).expanduser())
    if path.is_file():
        return [path]
    for index in ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json"):
        if (path / index).is_file():
            weight_map = _read_json(path / index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{path / index}: expected a 'weight_map' object of key -> shard file name")
            return [_require(path / s) for s in sorted(set(weight_map.values()))]
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin", "model.pt"):
        if (path / name).is_file():
            return [path / name]
    found = sorted(p.name for p in path.iterdir())[:20]
    raise FileNotFoundError(
        f"no weights in directory {path} (looked for model.safetensors, an index, "
        f"pytorch_model.bin, model.pt); it holds {found}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; anything else (unreadable, not UTF-8, not JSON, not an object) is a
    CheckpointError naming the file."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from None
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text (a binary file?): {exc}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path} is not valid JSON (truncated?): line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, expected an object of config keys")
    return value


def config_path(path: str | Path) -> Path:
    """Where the `config.json` describing the weights at `path` lives: in the folder, or beside the file."""
    path = Path(path).expanduser()
    return path / "config.json" if path.is_dir() else path.parent / "config.json"


def read_config(path: str | Path) -> dict | None:
    """The `config.json` of the weights' folder (`path` is the folder, or a weights file inside it), if any."""
    candidate = config_path(path)
    return _read_json(candidate) if candidate.is_file() else None


def check_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError (or FileNotFoundError) if the checkpoint at `path` is visibly unreadable, without
    reading any weight: config.json must be a JSON object, a safetensors header must parse and cover the file,
    a torch file must be a whole zip archive (torch.save) or an old-style pickle."""
    read_config(path)
    for file in weights_file(path):
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as f:
                    f.keys()
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(_unreadable(file, exc)) from None
        elif file.suffix in _TORCH_SUFFIXES:
            with open(file, "rb") as f:
                legacy = f.read(1) == b"\x80"  # torch.save's pre-1.6 format is a bare pickle
            if not legacy and not zipfile.is_zipfile(file):
                raise CheckpointError(
                    f"{file} is not a torch checkpoint: neither a whole zip archive (torch.save) "
                    "nor a legacy pickle; it may be truncated or corrupt"
                )
        else:
            raise CheckpointError(_unsupported(file))


def _unreadable(path: Path, exc: BaseException) -> str:
    return f"{path} cannot be read as {path.suffix[1:]} weights (truncated or corrupt?): {exc}"


def _unsupported(path: Path) -> str:
    return (
        f"unsupported checkpoint format {path.suffix!r} for {path}; use .safetensors, "
        f"{', '.join(_TORCH_SUFFIXES)} or an HF-style directory"
    )


def _read_one(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device=str(device))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(_unreadable(path, exc)) from None
    if path.suffix not in _TORCH_SUFFIXES:
        raise CheckpointError(_unsupported(path))
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only=True raises for anything but tensors and containers
        if is_truncated_pickle(exc):  # torch 2.3 reports a cut file this way too
            raise CheckpointError(_unreadable(path, exc)) from None
        raise CheckpointError(
            f"{path} is not a plain tensor checkpoint (read with weights_only=True, which refuses "
            f"pickled objects): {exc}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a truncated zip, a cut pickle: re-raised naming the file
        raise CheckpointError(_unreadable(path, exc)) from None
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _NESTED_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in weights_file(path):
        state.update(_read_one(file, device))
    # DDP / EMA wrappers prefix every key with "module."
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    try:  # int8 rows + scales (models/int8_rows.py) come back as float32
        return dequantize_rows(state, source=str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint", optional: Sequence[str] = ()
) -> None:
    """Raise CheckpointMismatchError listing every missing, unexpected and mis-shaped key.

    Keys in `optional` may be absent from the checkpoint (the model keeps its own values)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - set(optional))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or misshaped):
        return

    def listing(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:25]) + (f"\n    ... and {len(items) - 25} more" if len(items) > 25 else "")
        return f"  {title} ({len(items)}):\n    {shown}" if items else ""

    hint = ""
    if len(missing) + len(unexpected) > len(expected) // 2:
        hint = f"\n  (most keys differ: {source} looks like another architecture than {type(model).__name__})"
    parts = [listing("missing", missing), listing("unexpected", unexpected), listing("mis-shaped", misshaped)]
    raise CheckpointMismatchError(
        f"{source} does not fit {type(model).__name__}:\n" + "\n".join(p for p in parts if p) + hint
    )


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Load `path` into `model` strictly; cast to `dtype` and move to `device` when given.

    A model built on the meta device is materialised by the load itself (no double allocation).
    """
    state = read_state_dict(path, device="cpu" if device is None else device)
    check_state_dict(model, state, source=str(path))
    on_meta = any(p.is_meta for p in model.parameters())
    if dtype is not None:
        # Keep the float format of non-float buffers (none in STDiT3), cast everything else.
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=on_meta)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
