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
            self._check_options()
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

    def _check_options(self) -> None:
        if self.options and self.method is None:
            raise AttachError(
                "--cache-opt needs --cache METHOD (or a `cache = dict(method=...)` entry in the Open-Sora config)"
            )

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
        _say(
            f"cache {config.method!r} attached to {type(self.model).__name__} for {type(self.scheduler).__name__} "
            f"({self.scheduler.num_sampling_steps} steps): {config.to_dict()}"
        )

    def check_attached(self) -> None:
        self._check_options()  # a script that never read its config
        if self.method is not None and self.controller is None:
            missing = "no STDiT3 model" if self.model is None else "no sampler"
            raise AttachError(
                f"--cache {self.method}: the script built {missing} through "
                "opensora.registry.build_module, so the cache was never attached"
            )


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
    read = getattr(config_utils, "read_config", None)

    def build_module(module, builder, **kwargs):
        obj = build(module, builder, **kwargs)
        attachment.built(obj)
        return obj

    def parse_configs(*args, **kwargs):
        cfg = parse(*args, **kwargs)
        attachment.configured(cfg)
        return cfg

    def read_config(config_path, *args, **kwargs):
        check_config_file(str(config_path))
        return read(config_path, *args, **kwargs)

    registry.build_module, config_utils.parse_configs = build_module, parse_configs
    if read is not None:  # upstream's parse_configs reads the file through it
        config_utils.read_config = read_config

    def undo() -> None:
        registry.build_module, config_utils.parse_configs = build, parse
        if read is not None:
            config_utils.read_config = read

    return undo


_USAGE = (
    "python -m duca_video.opensora [SCRIPT] CONFIG [upstream's flags ...] [--cache METHOD] "
    "[--cache-opt KEY=VALUE ...] [--open-sora-root DIR] [--script PATH]"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m duca_video.opensora",
        usage=_USAGE,
        allow_abbrev=False,
        add_help=False,
        description="Run upstream Open-Sora 1.2's own inference script "
        "with the cache attached. Every argument but these goes to the script unchanged.",
        epilog="Upstream's own flags: python SCRIPT --help in the Open-Sora checkout. A "
        'config may instead carry cache = dict(method="duca", recompute_ratio=0.2); the '
        "flags win over it.",
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    p.add_argument("--cache", metavar="METHOD", help=f"a cache method: {', '.join(cache.METHODS)}")
    p.add_argument(
        "--cache-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the method (repeatable), e.g. --cache-opt recompute_ratio=0.2",
    )
    p.add_argument(
        "--open-sora-root",
        metavar="DIR",
        help="the Open-Sora checkout (default: the leading script's, else $OPEN_SORA_ROOT, else the current directory)",
    )
    p.add_argument(
        "--script",
        metavar="PATH",
        help="the script to run, instead of a leading one (default: DIR/scripts/inference.py)",
    )
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
    if given is not None and not given.strip():
        raise AttachError("--open-sora-root '': allowed: the folder of an Open-Sora checkout")
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
    CONFIG ...` (the user's own command behind the module): a .py file in a `scripts` folder. A missing one is
    an error here, not a config for upstream's script."""
    if not rest or not rest[0].endswith(".py") or Path(rest[0]).parent.name != "scripts":
        return None
    path = Path(rest[0]).expanduser().resolve()
    if not path.is_file():
        raise AttachError(f"script {rest[0]!r}: no such file; allowed: an Open-Sora checkout's scripts/inference.py")
    return path


def _checkout_of(script: Path) -> Path | None:
    checkout = script.parent.parent
    return checkout if (checkout / "opensora" / "registry.py").is_file() else None


def check_script(script: Path, flag: str) -> None:
    """The script builds its model through upstream's `opensora.registry.build_module` (what the cache attaches
    to): upstream's scripts/inference.py does; another program would run without the cache."""
    try:
        source = script.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AttachError(f"{flag} {str(script)!r} cannot be read: {exc}") from None
    if "build_module" not in source:
        raise AttachError(
            f"{flag} {str(script)!r} is not an Open-Sora inference script (it never calls "
            "opensora.registry.build_module, which the cache attaches to); allowed: upstream's "
            "scripts/inference.py"
        )


def check_config_file(path: str) -> None:
    """Upstream's config argument names a file (else upstream fails with a traceback)."""
    target = Path(path).expanduser()
    if not target.is_file():
        what = "is a folder" if target.is_dir() else "does not exist"
        raise AttachError(
            f"Open-Sora config {path!r} {what}; allowed: a config file, e.g. configs/opensora-v1-2/inference/sample.py"
        )


def _script_and_root(args: argparse.Namespace, rest: list[str]) -> tuple[Path, Path, list[str]]:
    if args.script is not None and not args.script.strip():
        raise AttachError("--script '': allowed: the path of the script to run")
    leading = _leading_script(rest)
    if leading is not None:
        if args.script is not None:
            raise AttachError(f"--script {args.script} and the script {rest[0]} given first: pass only one")
        check_script(leading, "script")
        given = args.open_sora_root
        checkout = _checkout_of(leading)
        root = find_root(given if given is not None or checkout is None else str(checkout))
        script, rest = leading, rest[1:]
    else:
        root = find_root(args.open_sora_root)
        script = Path(args.script).expanduser().resolve() if args.script else root / "scripts" / "inference.py"
        if not script.is_file():
            raise AttachError(f"--script {script}: no such file")
        check_script(script, "--script")
    if rest and not rest[0].startswith("-"):  # upstream's first positional argument: the config file
        check_config_file(rest[0])
    return script, root, rest


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.help:
        parser.print_help()
        return 0
    try:
        script, root, rest = _script_and_root(args, rest)
        options = _options(args.cache_opt)  # without --cache: for the method the config's `cache` entry names
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
