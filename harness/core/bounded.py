"""Reading files that came from elsewhere with bounds (issue 26): a run folder, a reference CSV or a baseline may be
a FIFO (an open would hang), a device (/dev/zero never ends), a symlink to either, or a small file whose header
claims gigabytes.

- `read_bytes(path, max_bytes)`: a regular file only (stat first: a FIFO or a device is never opened; then
  opened without blocking and checked again on the open file), at most `max_bytes`.
- `read_text` / `read_json`: the same, decoded (UTF-8; JSON nesting errors are errors, not RecursionErrors).
- `npz_problem(path, max_bytes)`: why a .npz must not be loaded (None when it may): every member an .npy whose
  header's shape x item size fits in the member and in `max_bytes`, no object arrays. Checked from the headers,
  before numpy allocates anything.

A missing file raises FileNotFoundError as open() would; everything else wrong is a BoundedReadError (a ValueError)
whose message names the path.
"""

from __future__ import annotations

import json
import math
import os
import stat
import zipfile
from pathlib import Path

import numpy as np


class BoundedReadError(ValueError):
    """A file that is not read: not a regular file, too large, or not what it should hold."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a regular file to read (None when it is); a dangling link or a missing file says so."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing (or a link to nothing)" if os.path.islink(path) else "missing"
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    return None if stat.S_ISREG(mode) else f"{_kind(mode)}, not a regular file"


def read_bytes(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `max_bytes` (see the module docstring)."""
    mode = os.stat(path).st_mode  # FileNotFoundError as open() would
    if not stat.S_ISREG(mode):
        raise BoundedReadError(f"{path}: {_kind(mode)}; a {what} must be a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
            raise BoundedReadError(f"{path}: {_kind(st.st_mode)}; a {what} must be a regular file")
        if st.st_size > max_bytes:
            raise BoundedReadError(f"{path}: {st.st_size:,} bytes; a {what} is at most {max_bytes:,} bytes")
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise BoundedReadError(f"{path}: more than {max_bytes:,} bytes; a {what} is at most that")
    return data


def read_text(path: str | os.PathLike, max_bytes: int, what: str = "file") -> str:
    data = read_bytes(path, max_bytes, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BoundedReadError(f"{path}: not UTF-8 (byte {e.start:,})") from None


def read_json(path: str | os.PathLike, max_bytes: int, what: str = "file"):
    text = read_text(path, max_bytes, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BoundedReadError(f"{path}: not JSON ({type(e).__name__})") from None


def _header(f, version: tuple[int, int]):
    reader = getattr(np.lib.format, "_read_array_header", None)
    if reader is not None:
        return reader(f, version, max_header_size=10_000)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f, max_header_size=10_000)
    return np.lib.format.read_array_header_2_0(f, max_header_size=10_000)


def npz_problem(path: str | os.PathLike, max_bytes: int) -> str | None:
    """Why the .npz at `path` must not be loaded (None when np.load may read it): see the module docstring."""
    problem = regular_file_problem(path)
    if problem:
        return problem
    total = 0
    try:
        with zipfile.ZipFile(Path(path)) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    return f"member {info.filename[:80]!r} is not an array"
                if info.file_size > max_bytes:
                    return f"{info.filename[:80]} holds {info.file_size:,} bytes, more than {max_bytes:,}"
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    shape, _, dtype = _header(f, version)
                if dtype.hasobject:
                    return f"{info.filename[:80]} holds Python objects"
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > info.file_size or nbytes > max_bytes:
                    return (f"{info.filename[:80]}'s header claims a {'x'.join(map(str, shape))} array of "
                            f"{nbytes:,} bytes in {info.file_size:,}")
                total += nbytes
                if total > max_bytes:
                    return f"its arrays hold more than {max_bytes:,} bytes"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


MAX_REFERENCE_BYTES = 1 << 20  # a paper's numbers are a few kB


def read_reference_csv(path: str | os.PathLike):
    """A table's reference CSV (table.reference.file) as a DataFrame: a regular file of at most
    MAX_REFERENCE_BYTES (/dev/zero or a FIFO named there is refused, never read), parsed from those bytes."""
    import io

    import pandas as pd

    data = read_bytes(path, MAX_REFERENCE_BYTES, "reference file")
    return pd.read_csv(io.BytesIO(data), nrows=100_000)
