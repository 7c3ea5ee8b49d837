"""Writing files so that no reader, and no crash, ever sees half of one: everything the harness stores
(records, tables, reports, checkpoints, the dataset cache) goes through `atomic_write`."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], directory: bool = False) -> None:
    """`write(tmp)` fills a temporary sibling of `path` (a file, or with `directory` a folder), which then
    replaces `path` in one rename. A folder that another process completed first is kept (it is identical:
    the dataset cache is keyed by its content)."""
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
            try:
                os.rename(tmp, path)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if directory else tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
