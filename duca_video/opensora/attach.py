"""`python -m duca_video.opensora`: upstream's scripts/inference.py with the cache attached (see __init__)."""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import runpy
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from .. import cache

_UPSTREAM_SEED = 1024  # upstream's scripts/inference.py: set_random_seed(seed=cfg.get("seed", 1024))


class AttachError(ValueError):
    """Bad input to the attachment (root, method, settings): `error: ...`, exit status 2."""


class Attachment:
    """Collects what upstream's script builds and enables the cache once it has the model and the sampler."""

    def __init__(self, method: str | None = None, options: Mapping[str, Any] | None = None) -> None:
        self.method, self.options = method, dict(options or {})
        self.model: nn.Module | None = None
        self.scheduler: Any = None
        self.controller: cache.CacheController | None = None
        self.seed = _UPSTREAM_SEED

    def configured(self, cfg: Mapping[str, Any]) -> None:
        """Upstream's parsed config: its `cache` entry (flags win over it) and its seed."""
        seed = cfg.get("seed", _UPSTREAM_SEED)
        self.seed = _UPSTREAM_SEED if seed is None else int(seed)
        entry = cfg.get("cache")
        if entry is None:
            return
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, Mapping) or not isinstance(entry.get("method"), str):
            raise AttachError(f"config: cache = {entry!r} is invalid; allowed: dict(method=NAME, SETTING=VALUE, ...)")
        settings = {k: v for k, v in entry.items() if k != "method"}
        if self.method is None:
            self.method, self.options = entry["method"], {**settings, **self.options}
        elif self.method == entry["method"]:  # the config's settings for that method, the flags' on top
            self.options = {**settings, **self.options}
        _config(self.method, self.options)

    def built(self, obj: Any) -> None:
        """Everything upstream's build_module returns; the first STDiT3 and the first sampler are kept."""
        if self.model is None and isinstance(obj, nn.Module) and _has_blocks(obj):
            self.model = obj
        elif self.scheduler is None and hasattr(obj, "num_sampling_steps") and callable(getattr(obj, "sample", None)):
            self.scheduler = obj
        if self.method is not None and self.controller is None and self.model is not None and self.scheduler:
            self._enable()

    def _enable(self) -> None:
        config = _config(self.method, self.options)
        for name, value in config.sampler_settings().items():  # e.g. `steps`: fewer steps is the sampler's setting
            for holder in (self.scheduler, getattr(self.scheduler, "scheduler", None)):
                if holder is not None and hasattr(holder, name):
                    setattr(holder, name, value)
        self.controller = cache.enable(self.model, config, scheduler=self.scheduler, seed=self.seed)
        _say(f"cache {config.method!r} attached to {type(self.model).__name__} for {type(self.scheduler).__name__} "
             f"({self.scheduler.num_sampling_steps} steps): {config.to_dict()}")  # fmt: skip

    def check_attached(self) -> None:
        if self.method is not None and self.controller is None:
            missing = "no STDiT3 model" if self.model is None else "no sampler"
            raise AttachError(f"--cache {self.method}: the script built {missing} through "
                              "opensora.registry.build_module, so the cache was never attached")  # fmt: skip


def _has_blocks(model: nn.Module) -> bool:
    try:
        return bool(cache.find_blocks(model))
    except ValueError:
        return False


def _config(method: str, options: Mapping[str, Any]) -> cache.CacheConfig:
    try:
        return cache.make_config(method, **options)
    except (TypeError, ValueError) as exc:
        raise AttachError(f"cache: {exc}") from None


def _say(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[duca-video] {message}", file=sys.stderr, flush=True)


def attach(attachment: Attachment) -> Callable[[], None]:
    """Wrap upstream's `opensora.registry.build_module` and `opensora.utils.config_utils.parse_configs`
    (the names its scripts import) for `attachment`; returns a function that undoes it."""
    registry = importlib.import_module("opensora.registry")
    config_utils = importlib.import_module("opensora.utils.config_utils")
    build, parse = registry.build_module, config_utils.parse_configs

    def build_module(module, builder, **kwargs):
        obj = build(module, builder, **kwargs)
        attachment.built(obj)
        return obj

    def parse_configs(*args, **kwargs):
        cfg = parse(*args, **kwargs)
        attachment.configured(cfg)
        return cfg

    registry.build_module, config_utils.parse_configs = build_module, parse_configs

    def undo() -> None:
        registry.build_module, config_utils.parse_configs = build, parse

    return undo


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m duca_video.opensora", allow_abbrev=False, add_help=False,
                                description=__doc__)  # fmt: skip
    p.add_argument("--cache", metavar="METHOD")
    p.add_argument("--cache-opt", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--open-sora-root", metavar="DIR")
    p.add_argument("--script", metavar="PATH")
    return p


def _options(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise AttachError(f"--cache-opt {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = text.strip()  # a name, e.g. selector=k_norm
    return out


def find_root(given: str | None) -> Path:
    candidates = [("--open-sora-root", given), ("$OPEN_SORA_ROOT", os.environ.get("OPEN_SORA_ROOT"))]
    for source, value in candidates:
        if value:
            root = Path(value).expanduser().resolve()
            if not (root / "opensora" / "registry.py").is_file():
                raise AttachError(f"{source}={value}: not an Open-Sora checkout (no opensora/registry.py there)")
            return root
    here = Path.cwd()
    if (here / "opensora" / "registry.py").is_file():
        return here
    raise AttachError("no Open-Sora checkout: pass --open-sora-root DIR, set OPEN_SORA_ROOT, or run from its root")


def _leading_script(rest: Sequence[str]) -> Path | None:
    """The script when the command starts with it, as in `python -m duca_video.opensora scripts/inference.py
    CONFIG ...` (the user's own command behind the module): a file in the `scripts` folder of a checkout."""
    if not rest or not rest[0].endswith(".py"):
        return None
    path = Path(rest[0]).expanduser().resolve()
    checkout = path.parent.parent
    is_script = path.is_file() and path.parent.name == "scripts" and (checkout / "opensora" / "registry.py").is_file()
    return path if is_script else None


def _script_and_root(args: argparse.Namespace, rest: list[str]) -> tuple[Path, Path, list[str]]:
    leading = _leading_script(rest)
    if leading is not None:
        if args.script:
            raise AttachError(f"--script {args.script} and the script {rest[0]} given first: pass only one")
        root = find_root(args.open_sora_root or str(leading.parent.parent))
        return leading, root, rest[1:]
    root = find_root(args.open_sora_root)
    script = Path(args.script).resolve() if args.script else root / "scripts" / "inference.py"
    if not script.is_file():
        raise AttachError(f"--script {script}: no such file")
    return script, root, rest


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        script, root, rest = _script_and_root(args, rest)
        options = _options(args.cache_opt)
        if options and args.cache is None:
            raise AttachError("--cache-opt needs --cache METHOD (or a `cache = dict(method=...)` config entry)")
        if args.cache is not None:
            _config(args.cache, options)
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        attachment = Attachment(args.cache, options)
        try:
            undo = attach(attachment)
        except ImportError as exc:
            raise AttachError(f"cannot import Open-Sora from {root}: {exc} (install its requirements)") from None
        saved_argv = sys.argv
        sys.argv = [str(script), *rest]
        try:
            runpy.run_path(str(script), run_name="__main__")
            attachment.check_attached()
        finally:
            sys.argv = saved_argv
            undo()
    except AttachError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if attachment.controller is not None:
        _say(attachment.controller.summary())
    return 0
