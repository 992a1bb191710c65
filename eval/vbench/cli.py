"""What the eval/vbench scripts share on the command line (standard library only): one `error: ...` line and exit
status 2 for bad arguments, argument types that refuse zero, negatives, NaN and empty strings, output paths
checked before any work, and standard output that may be closed early (`generate.py --list | head -1`)."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from eval.common import EvalError

__all__ = ["Parser", "check_output_dir", "check_output_file", "nonempty", "positive_int", "run_script", "say"]


class Parser(argparse.ArgumentParser):
    """argparse with the scripts' error format: one `error: ...` line (exit 2); the usage only on --help."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """A whole number >= 1 ("0", "-3", "nan", "1.5" and "" are refused)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def nonempty(text: str) -> str:
    """A path or list that is not empty: an empty one would otherwise mean the working directory or a default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(".")


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """A folder that is there or can be made: not a file, nor under one, and writable where it would be made."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise EvalError(f"{flag} {str(path)!r} is a file, not a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise EvalError(f"{flag} {str(path)!r} cannot be made: {str(base)!r} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise EvalError(f"{flag} {str(path)!r}: {str(base)!r} is not writable")
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file that can be written: not a folder, its folder there or makeable."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise EvalError(f"{flag} {str(path)!r} is a folder, not a file")
    try:
        check_output_dir(path.parent, "its folder")
    except EvalError as exc:
        raise EvalError(f"{flag} {str(path)!r}: {exc}") from None
    return path


def _drop_stdout() -> None:
    """The reader went away: send what is still to come (and Python's flush at exit) to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def say(*args: object, end: str = "\n") -> None:
    """print() to standard output that carries on quietly once the reader has closed the pipe."""
    try:
        print(*args, end=end, flush=True)
    except BrokenPipeError:
        _drop_stdout()


def run_script(main: Callable[[], int]) -> int:
    """main()'s exit status, with standard output flushed here (a closed pipe is not an error) rather than at
    exit, where Python would report the closed pipe and exit 120."""
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
    return code
