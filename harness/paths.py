"""Where the harness may write: names that become folders, and every written path kept under its root.

Two guards, so one mistake is not enough to write outside `--runs-dir` / `--reports-dir`:

1. Study, profile and table names become folder and file names, so they follow one rule, checked where the
   study is loaded (`name_problem`): letters, digits, `_`, `-` and `.`, at most 100 characters, not `.` or `..`
   (no separator, nothing absolute, nothing that climbs).
2. Every path built from them is normalised and checked to stay under its root (`inside`), whatever slipped
   through the first guard. The check is lexical (`..` and absolute parts), not through symlinks: a user may
   link a run folder to a larger disk, and a study file cannot create links.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
NAME_RULE = "letters, digits, '_', '-' and '.', at most 100 characters, not '.' or '..'"


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a study, profile or table name (None when it can)."""
    if not isinstance(name, str):
        return f"{name!r} is not a string"
    if not SAFE_NAME.fullmatch(name) or name in (".", ".."):
        return f"{name!r} is not a safe name ({NAME_RULE}): it becomes a folder or file name"
    return None


class UnsafePath(ValueError):
    """A path the harness was about to write escapes the root it belongs under."""


def inside(root: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """`root / parts...`, refused (UnsafePath) unless it stays at or under `root` once `..` and absolute parts
    are resolved. Returns the path as given (relative stays relative)."""
    path = Path(root).joinpath(*parts)
    base, full = os.path.abspath(root), os.path.abspath(path)
    if os.path.commonpath([base, full]) != base:
        raise UnsafePath(f"refusing to write {path}: it is outside {root}")
    return path
