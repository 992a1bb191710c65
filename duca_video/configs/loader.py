"""Config files and the command line: a Python file of fields, then flags that override single fields.

A config file is Python (as in Open-Sora): every top-level name that does not start with `_` and is not a
module, function or class is a field. Names starting with `_` are the file's own helpers, e.g.
`_weights = "weights/tiny"` used by several sections.
"""

from __future__ import annotations

import argparse
import ast
import copy
import io
import os
import runpy
import tokenize
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .schema import CACHE_METHODS, ConfigError, InferenceConfig

__all__ = ["WEIGHT_ENV_VARS", "build_parser", "config_from_args", "load_config", "read_config_file"]

# Where weights come from when neither a flag nor the config names them: section -> (variable, flag).
WEIGHT_ENV_VARS = {
    "model": ("DUCA_CKPT_PATH", "--ckpt-path"),
    "vae": ("DUCA_VAE_PATH", "--vae-path"),
    "text_encoder": ("DUCA_T5_PATH", "--text-encoder-path"),
}

# flag dest -> (section, field) for flags that set a field inside a section.
_SECTION_FLAGS = {
    "ckpt_path": ("model", "from_pretrained"),
    "vae_path": ("vae", "from_pretrained"),
    "text_encoder_path": ("text_encoder", "from_pretrained"),
    "num_sampling_steps": ("scheduler", "num_sampling_steps"),
    "cfg_scale": ("scheduler", "cfg_scale"),
    "cache": ("cache", "method"),
    "cache_offload": ("cache", "offload"),
}
_NOT_FIELDS = {"config", "cache_opt"}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The fields a Python config file defines. Every way a file can fail (missing, binary, not in its
    encoding, a syntax error, an exception or exit() while it runs) is a ConfigError naming the file."""
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        raise ConfigError(f"config file {name} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {name} cannot be read: {exc}") from None
    if b"\0" in data:
        raise ConfigError(f"config file {name} is not a Python text file (it contains NUL bytes: a binary file?)")
    try:  # the encoding a `# -*- coding: ... -*-` line declares, else UTF-8, as Python reads source
        source = data.decode(tokenize.detect_encoding(io.BytesIO(data).readline)[0])
    except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
        raise ConfigError(f"config file {name} is not readable Python source text: {exc}") from None
    try:
        ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"config file {name} does not parse: line {exc.lineno}: {exc.msg}") from None
    try:
        namespace = runpy.run_path(str(path), run_name="__duca_config__")
    except SystemExit as exc:  # exit() / sys.exit() in a config must not end the program with the file's status
        raise ConfigError(
            f"config file {name} called exit({exc.code!r}) while it ran; a config only sets fields"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure in user code is reported with the file's name
        raise ConfigError(f"config file {name} failed to run: {type(exc).__name__}: {exc}") from None
    skip = (types.ModuleType, types.FunctionType, type)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not isinstance(v, skip)}


def _literal(text: str) -> Any:
    # Cache settings from the command line: numbers, booleans, None and lists as Python literals, else a string.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_args(values: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A copy of the config fields with every flag the user gave written over its field."""
    out = copy.deepcopy(values)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_FIELDS}
    for dest, value in given.items():
        if dest in _SECTION_FLAGS:
            section, name = _SECTION_FLAGS[dest]
            current = out.get(section) or {}
            if not isinstance(current, dict):
                raise ConfigError(f"{section} must be a dict, got {type(current).__name__}")
            if dest == "cache" and value != current.get("method", "none"):
                # Settings written for another method rarely fit this one: start from its defaults.
                current = {}
            out[section] = {**current, name: value}
        else:
            out[dest] = value
    if "image_size" not in given and ({"resolution", "aspect_ratio"} & set(given)):
        out["image_size"] = None  # a size asked for on the command line beats a fixed size in the file
    if "prompt" in given:
        out["prompt_path"] = None
    elif "prompt_path" in given:
        out["prompt"] = None
    for item in args.cache_opt or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--cache-opt {item!r}: expected KEY=VALUE")
        cache = dict(out.get("cache") or {})
        cache[key.strip()] = _literal(text.strip())
        out["cache"] = cache
    return out


def load_config(path: str | os.PathLike, args: argparse.Namespace | None = None) -> InferenceConfig:
    values = read_config_file(path)
    if args is not None:
        values = apply_args(values, args)
    return InferenceConfig.from_dict(values)


def config_from_args(argv: Sequence[str] | None = None) -> tuple[InferenceConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    return load_config(args.config, args), args


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one `error: ...` line (exit 2), the usage only on --help."""

    def error(self, message: str) -> typing.NoReturn:
        # Under torchrun every rank parses the same flags: rank 0 alone reports them (one line, not one per rank).
        self.exit(2, f"error: {message} (see {self.prog} --help)\n" if os.environ.get("RANK", "0") == "0" else None)


def build_parser() -> argparse.ArgumentParser:
    """Open-Sora 1.2's inference flags (same names), plus --cache, --cache-opt and --save-latents.
    Every flag defaults to None, meaning "keep the config's value"."""
    p = _Parser(
        prog="scripts/inference.py",
        description="Generate videos with Open-Sora 1.2 (STDiT3) and feature caching.",
        epilog="Weights: --ckpt-path / $DUCA_CKPT_PATH (STDiT3), --vae-path / $DUCA_VAE_PATH, "
        "--text-encoder-path / $DUCA_T5_PATH. A flag beats the config, the config beats the variable.",
    )
    p.add_argument("--config", required=True, help="Python config file, e.g. configs/duca_480p.py")
    _prompt_flags(p)
    _video_flags(p)
    _sampling_flags(p)
    _weight_flags(p)
    _output_flags(p)
    _conditioning_flags(p)
    return p


def _prompt_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", nargs="+", action="extend", help="prompt(s); repeatable")
    g.add_argument("--prompt-path", help="text file, one prompt per line (blank lines skipped)")
    g.add_argument("--start-index", type=int, help="first prompt to generate (0-based)")
    g.add_argument("--end-index", type=int, help="stop before this prompt")
    g.add_argument("--num-sample", type=int, help="videos per prompt; the k-th uses seed + k")
    g.add_argument(
        "--shard",
        help="I/N: generate the I-th of N contiguous shares of the planned videos (0-based; "
        "job arrays writing into one folder)",
    )
    g.add_argument("--aes", type=float, help='aesthetic score appended as " aesthetic score: X."')
    g.add_argument("--flow", type=float, help='motion score appended as " motion score: X."')
    g.add_argument("--camera-motion", help='appended as " camera motion: X."')
    g.add_argument(
        "--clean-prompts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clean prompts as Open-Sora does before T5 (lower case, links, HTML); default on",
    )


def _video_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video")
    g.add_argument("--resolution", help="144p, 240p, 360p, 480p or 720p")
    g.add_argument("--aspect-ratio", help="H:W, e.g. 9:16")
    g.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="explicit size (beats resolution)")
    g.add_argument("--num-frames", help="frames (51) or seconds (2s=51, 4s=102, 8s=204, 16s=408)")
    g.add_argument("--fps", type=int, help="frame rate the model is conditioned on")
    g.add_argument("--save-fps", type=int, help="frame rate written into the mp4")
    g.add_argument("--frame-interval", type=int, help="save fps defaults to fps // frame interval")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--seed", type=int)
    g.add_argument("--num-sampling-steps", type=int)
    g.add_argument("--cfg-scale", type=float)
    g.add_argument("--batch-size", type=int, help="prompts denoised together")
    g.add_argument("--dtype", help="bf16, fp16 or fp32")
    g.add_argument("--device", help="auto (CUDA when available), cpu, cuda or cuda:N")
    g.add_argument(
        "--sp-size",
        type=int,
        help="ranks per sequence-parallel group under torchrun (default: all); "
        "world / sp groups generate different prompts",
    )
    g.add_argument(
        "--cfg-parallel",
        action="store_true",
        default=None,
        help="run the conditional and unconditional CFG halves on two ranks (torchrun; with --sp-size: "
        "world = data x 2 x sp)",
    )
    g.add_argument(
        "--cache", choices=CACHE_METHODS, help="caching method; the config's cache settings apply to its method only"
    )
    g.add_argument(
        "--cache-offload",
        action="store_true",
        default=None,
        help="keep the cache in host memory, each block's share prefetched to the device while "
        "the block before it runs",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the blocks' attention, cross-attention and MLP (the first batch compiles)",
    )
    g.add_argument(
        "--cache-opt",
        action="append",
        metavar="KEY=VALUE",
        help="cache setting, typed by the setting (lists: recompute=attn,mlp); repeatable",
    )


def _weight_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weights")
    g.add_argument("--ckpt-path", help="STDiT3 checkpoint (file or folder); env DUCA_CKPT_PATH")
    g.add_argument("--vae-path", help="Open-Sora VAE checkpoint; env DUCA_VAE_PATH")
    g.add_argument("--text-encoder-path", help="T5 folder (e.g. t5-v1_1-xxl); env DUCA_T5_PATH")


def _output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("outputs")
    g.add_argument("--save-dir", help="folder for NAME.mp4 / NAME.json (created)")
    g.add_argument("--sample-name", help="file name prefix, no path (default 'sample' -> sample_0000)")
    g.add_argument("--prompt-as-path", action="store_true", default=None, help="VBench naming {prompt}-{k}.mp4")
    g.add_argument("--save-latents", action="store_true", default=None, help="also write NAME.latent.safetensors")
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="regenerate videos whose records show other settings (default: refuse)",
    )
    g.add_argument(
        "--count-flops", action=argparse.BooleanOptionalAction, default=None, help="count DiT FLOPs during sampling"
    )
    g.add_argument("--quiet", action="store_true", default=None, help="no progress bars or per-video lines")


def _conditioning_flags(p: argparse.ArgumentParser) -> None:
    """Open-Sora 1.2's image / video conditioning flags (docs/commands.md), same names and meanings."""
    g = p.add_argument_group("conditioning (images and videos, Open-Sora 1.2)")
    g.add_argument(
        "--reference-path",
        nargs="+",
        metavar="PATHS",
        help='reference image/video per prompt (one for all, or one per prompt); ";" separates several '
        'of one prompt, e.g. "a.png;b.mp4"; also "reference_path" in a prompt\'s JSON',
    )
    g.add_argument(
        "--mask-strategy",
        nargs="+",
        metavar="GROUPS",
        help='per prompt, ";"-separated groups "loop,reference,ref_start,target_start,length,edit_ratio" '
        '(defaults 0,0,0,0,1,0; latent frames): "0": image to video, "0,0,0,-8,8": extension',
    )
    g.add_argument("--loop", type=int, help="clips per video, each continuing the previous (prompts '|0|a|2|b')")
    g.add_argument(
        "--condition-frame-length",
        type=int,
        help="latent frames of the previous clip that start the next one (default 5)",
    )
    g.add_argument("--condition-frame-edit", type=float, help="edit ratio of those frames, 0..1 (default 0: kept)")
    g.add_argument("--align", type=int, help="snap negative mask-strategy starts to multiples of this (v1.2: 5)")
