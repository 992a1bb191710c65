"""Argument checks shared by the tools' command lines, to the inference CLI's standard (scripts/inference.py).

A bad value is refused before any work: one `error: ...` line on stderr naming the flag and what is allowed,
exit status 2, no traceback. A value is never replaced by a default; output paths are checked before the work
(their folder exists and is writable, and no folder stands where a file goes). Standard library only.

    p = ToolParser(prog="scripts/tool.py")
    p.add_argument("--steps", type=positive_int)
    args = p.parse_args(argv)
    p.check(output_file, args.json, "--json")     # or refuse("--x ...: allowed ...")
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "ArgError",
    "ToolParser",
    "UsageExit",
    "finite_float",
    "int_at_least",
    "int_list",
    "name_list",
    "nonempty",
    "output_file",
    "output_folder",
    "positive_float",
    "positive_int",
    "refuse",
]


class ArgError(ValueError):
    """A command-line value that is not allowed; the message names the flag and what is allowed."""


class UsageExit(SystemExit):
    """Exit status 2 after the `error: ...` line was printed; str() is the message (for callers that catch it)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def refuse(message: str) -> typing.NoReturn:
    """Print `error: MESSAGE` (one line) and exit with status 2."""
    line = " ".join(str(message).split())  # one line, whatever the message holds
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise UsageExit(line)


class ToolParser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one `error: ...` line (exit 2); the usage only on --help."""

    def error(self, message: str) -> typing.NoReturn:
        refuse(f"{message} (see {self.prog} --help)")

    def check(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, its ArgError refused as a usage error."""
        try:
            return fn(*args)
        except ArgError as exc:
            refuse(str(exc))


# ------------------------------------------------------------------------------------------ value types
def _int(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: an integer >= {low}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


positive_int = int_at_least(1)


def finite_float(text: str) -> float:
    """An argparse type: a finite number (no nan, no inf)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: a finite number")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: a finite number > 0")
    return value


def nonempty(text: str) -> str:
    """An argparse type: a string that is not empty (nor only spaces)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: a non-empty value")
    return text


def name_list(allowed: tuple[str, ...] | None = None, empty_ok: bool = False) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each from `allowed` (when given), none empty, none twice; the
    whole list empty only with `empty_ok`."""
    what = f"comma-separated names from {', '.join(allowed)}" if allowed else "comma-separated names"

    def parse(text: str) -> list[str]:
        if not text.strip() and empty_ok:
            return []
        names = [part.strip() for part in text.split(",")]
        if not text.strip() or "" in names:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed (an empty name); allowed: {what}")
        bad = [n for n in names if allowed is not None and n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad))} not allowed; allowed: {what}")
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"{text!r} names one twice; allowed: {what}, each once")
        return names

    parse.__name__ = "name list"
    return parse


def int_list(low: int) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each >= `low`, at least one."""

    def parse(text: str) -> list[int]:
        parts = [part.strip() for part in text.split(",")]
        if not text.strip() or "" in parts:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: comma-separated integers >= {low}")
        return [int_at_least(low)(part) for part in parts]

    parse.__name__ = "integer list"
    return parse


# ------------------------------------------------------------------------------------------ output paths
def _writable_folder(folder: Path, flag: str, path: str) -> None:
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise ArgError(
            f"{flag} {path!r}: its folder {str(folder)!r} {what}; allowed: a path in an existing, writable folder"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArgError(
            f"{flag} {path!r}: its folder {str(folder)!r} is not writable; allowed: a path in a writable folder"
        )


def _nearest_existing(path: Path) -> Path:
    for folder in path.parents:
        if folder.exists():
            return folder
    return Path(".")


def output_file(path: str | None, flag: str, create_folders: bool = False) -> Path | None:
    """The file `flag` names, checked before any work: not empty, not a folder, writable if it exists, and its
    folder exists and is writable (with `create_folders`: the nearest existing folder above it, as the tool
    creates the rest). None stays None (the output is optional)."""
    if path is None:
        return None
    if not str(path).strip():
        raise ArgError(f"{flag} {path!r}: allowed: a file path")
    target = Path(path).expanduser()
    if target.is_dir() or str(path).endswith(("/", os.sep)):
        raise ArgError(f"{flag} {path!r} is a folder; allowed: a file path (the file is written there)")
    if target.exists() and not os.access(target, os.W_OK):
        raise ArgError(f"{flag} {path!r}: the file exists and is not writable; allowed: a writable file path")
    folder = target.parent
    if create_folders and not folder.exists():
        folder = _nearest_existing(target)
    _writable_folder(folder, flag, str(path))
    return target


def output_folder(path: str | None, flag: str) -> Path | None:
    """The folder `flag` names (created by the tool if missing), checked before any work: not empty, not a
    file, and it (or the nearest existing folder above it) is a writable folder. None stays None."""
    if path is None:
        return None
    if not str(path).strip():
        raise ArgError(f"{flag} {path!r}: allowed: a folder path")
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ArgError(f"{flag} {path!r} is a file; allowed: a folder (created if missing)")
    if target.is_dir():
        if not os.access(target, os.W_OK | os.X_OK):
            raise ArgError(f"{flag} {path!r}: the folder is not writable; allowed: a writable folder")
        return target
    _writable_folder(_nearest_existing(target), flag, str(path))
    return target
