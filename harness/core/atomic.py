"""Writing files so that no reader, and no crash, ever sees half of one: everything the harness stores
(records, tables, reports, checkpoints, the dataset cache) goes through `atomic_write`.

A rename alone is atomic against a crash of the process, not against a power loss: the kernel may write the
rename to disk before the file's data, leaving an empty or truncated file under the final name. So the data is
fsynced before the rename (every file of a folder, and the folder itself), and the parent folder after it, so
the rename itself is on disk when `atomic_write` returns.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, to disk (a file system that cannot, e.g. some FUSE mounts,
    is left as it is)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], directory: bool = False) -> None:
    """`write(tmp)` fills a temporary sibling of `path` (a file, or with `directory` a folder), which is flushed
    to disk and then replaces `path` in one rename. A folder that another process completed first is kept (it
    is identical: the dataset cache is keyed by its content)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, (0o777 if directory else 0o666) & ~_UMASK)  # as open() would have made it, not mkstemp's 0600
        if directory:
            _fsync_tree(tmp)
            try:
                os.rename(tmp, path)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            fsync_path(tmp)
            os.replace(tmp, path)
        fsync_path(path.parent)  # the rename itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if directory else tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
