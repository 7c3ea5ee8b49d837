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


def own_path(root: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """`inside(root, *parts)`, and through links too: what exists of the path below `root` resolves under `root`'s
    own real location. For the folders the harness makes inside a run or report folder (trials/<id>/, a table's
    plot folder, search/), where a symbolic link is never its own: one planted there would send a write (or a read
    into the page) elsewhere. `root` itself may be a link (a run folder on a larger disk)."""
    path = inside(root, *parts)
    base, top = os.path.realpath(root), os.path.abspath(root)
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and probe != top:
        probe = os.path.dirname(probe)
    if probe == top:  # nothing below the root exists yet (or only the root): nothing can lead elsewhere
        return path
    real = os.path.realpath(probe)
    if os.path.commonpath([base, real]) != base:
        raise UnsafePath(f"refusing to use {path}: {probe} leads to {real}, outside {root} (a symbolic link the "
                         "harness did not make: remove it)")
    return path


IDENTITY = re.compile(r"[0-9a-f]{12}")


def identity_problem(text: object) -> str | None:
    """Why `text` is not a trial or search-unit identity (12 hex digits, harness.study.trials.trial_identity): stored
    data (results.parquet, a search summary) names trials, and a name is checked before it is joined to a path."""
    if isinstance(text, str) and IDENTITY.fullmatch(text):
        return None
    return f"{str(text)[:60]!r} is not a trial identity (12 hex digits)"


# ----------------------------------------------------------------------------- names the report writes

# Every file and folder the report writes at the top of its folder besides the tables' own (harness.report.build,
# harness.report.search, harness.report.html): a table's plot folder may not take one of these names.
REPORT_FILES = ("table.md", "table.csv", "table.tex", "table_stats.csv", "table_localisation.csv",
                "table_localisation.tex", "table_localisation_stats.csv", "protocol.md", "index.html", "summary.json",
                "search.md", "search", "learning_curves.png", "compare.md", "compare.html")


def _table_outputs(name: str) -> list[str]:
    """What the report writes for a named table: its plot folder, and its CSV, LaTeX and statistics with its
    localisation table's (harness.report.build.write_tables)."""
    stems = [f"table_{name}", f"table_{name}_localisation"]
    return [name] + [f"{stem}{ext}" for stem in stems for ext in (".csv", ".tex", "_stats.csv")]


def table_names_problem(names: list[str]) -> str | None:
    """Why these table names cannot share one report folder (None when they can): a name whose plot folder would
    be one of the report's own files, or two tables whose files would be one (`a` and `a_stats`: both write
    table_a_stats.csv; `a` and `a_localisation`). Compared without case (a Mac's or Windows' disk)."""
    owner = {f.lower(): "the report itself" for f in REPORT_FILES}
    for name in names:
        for path in _table_outputs(name):
            other = owner.get(path.lower())
            if other is not None:
                what = "is one of the report's own files" if other == "the report itself" else \
                    f"would also be written for table '{other}'"
                return (f"table name '{name}': its {'plot folder' if path == name else 'file'} {path} {what}; "
                        "rename the table (e.g. without a file extension, '_stats' or '_localisation' at its end)")
            owner[path.lower()] = name
    return None


# ----------------------------------------------------------------------------- files in shared folders

def refuse_link(path: str | os.PathLike, what: str = "file") -> None:
    """Raise UnsafePath when `path` is a symbolic link (or anything but a regular file where one is expected):
    a file the harness writes in a shared folder is its own, never a link that would send the write elsewhere."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    import stat

    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"refusing to write {path}: it is a symbolic link (to {os.readlink(path)!r}); the {what} "
                         "is the harness's own: remove the link")
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"refusing to write {path}: it is not a regular file; remove it")


def open_own(path: str | os.PathLike, what: str = "file") -> int:
    """A file descriptor of `path` opened for reading and writing, created if absent, never through a symbolic
    link (O_NOFOLLOW), and a regular file (a FIFO or a device is refused without blocking)."""
    import stat

    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | \
        getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if os.path.islink(path):
            raise UnsafePath(f"refusing to open {path}: it is a symbolic link (to {os.readlink(path)!r}); the {what} "
                             "is the harness's own: remove the link") from None
        raise e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"refusing to open {path}: it is not a regular file; remove it")
    os.set_blocking(fd, True)
    return fd


def write_problem(e: OSError, flag: str = "--runs-dir") -> str:
    """An OSError of a write (a full disk, a read-only or unwritable folder) as a message with its path and the
    fix, for `cannot run: ...` (exit 2) instead of a traceback."""
    import errno

    where = e.filename or "the run folder"
    if e.errno == errno.ENOSPC or e.errno == getattr(errno, "EDQUOT", -1):
        return f"{where}: no space left on the device; free space there, or give {flag} a folder on another disk"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "a read-only file system" if e.errno == errno.EROFS else "permission denied"
        return f"{where}: {why}; give {flag} a folder you can write (or fix its permissions)"
    return f"{where}: {e.strerror or e}"
