"""Fail when installing duca-video would change (or changed) a package the environment already had.

    check_unchanged.py dry-run BEFORE.txt REPORT.json   # pip install --dry-run --report REPORT.json
    check_unchanged.py installed BEFORE.txt AFTER.txt   # pip list --format=freeze, before and after

New packages are allowed and listed; an upgrade, a downgrade or a removal is an error (exit 1).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _freeze(path: Path) -> dict[str, str]:
    pairs = (line.split("==", 1) for line in path.read_text().splitlines() if "==" in line)
    return {_name(name): version for name, version in pairs}


def _planned(report: Path) -> dict[str, str]:
    items = json.loads(report.read_text())["install"]
    return {_name(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("dry-run", "installed"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    mode, before = argv[0], _freeze(Path(argv[1]))
    after = _planned(Path(argv[2])) if mode == "dry-run" else _freeze(Path(argv[2]))
    after.pop("duca-video", None)
    changed = [f"{n} {before[n]} -> {v}" for n, v in sorted(after.items()) if n in before and before[n] != v]
    removed = [f"{n} {v} removed" for n, v in sorted(before.items()) if mode == "installed" and n not in after]
    added = [f"{n} {v}" for n, v in sorted(after.items()) if n not in before]
    what = "would add" if mode == "dry-run" else "added"
    print(f"duca-video {what} {len(added)} new package(s): {', '.join(added) or 'none'}")
    if changed or removed:
        print(
            f"error: installing duca-video {'would change' if mode == 'dry-run' else 'changed'} the "
            f"environment: {'; '.join(changed + removed)}",
            file=sys.stderr,
        )
        return 1
    print(f"duca-video {'would change' if mode == 'dry-run' else 'changed'} none of the {len(before)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
