"""Per-row arrays kept in files rather than in the process's memory: what a job holds of every row (id keys,
lengths, the plan's row order, the oracle's counts) is mapped from a file under ``OUT/.fbas/``, and the pages a
step touched are handed back (``release``) when it moves on, so the process's resident memory does not grow
with the corpus. The kernel keeps the pages in its cache while there is room and writes them back when there
is not.

    a = RowFile.create(path, np.uint64, n)            # zeros; ``a.array`` is an ndarray over the file
    a.array[lo:hi] = keys; release(a.array[lo:hi])    # written, then its pages unmapped (the data stays)
    b = RowFile.open(path, np.uint64)                 # read-only, its length from the file's size
    c = RowFile.scratch(folder, np.uint16, n)         # an unlinked file: gone when the process ends

``backing(arr)`` tells whether an array is such a mapping, and of which file; ``store`` saves an array to a file,
flushing it in place when it is that file's own mapping rather than copying the file onto itself. ``blocks(arr)``
walks any array in blocks and releases each one after use: whole-array work (counting, comparing, copying) then
holds one block at a time.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from core.errors import PermanentError

__all__ = ["RowFile", "backing", "blocks", "release", "store", "equal", "BLOCK_BYTES"]

BLOCK_BYTES = 1 << 20  # what whole-array walks hold at a time
_PAGE = mmap.PAGESIZE


class _Map(mmap.mmap):
    """A file mapping that remembers its file (a subclass, so that it can carry attributes)."""

    inode: tuple[int, int]
    addr: int  # where the mapping starts in this process's memory


class RowFile:
    """A 1-D array of ``dtype`` mapped from a file (``MAP_SHARED``): writes go to the file. See the module
    docstring."""

    def __init__(self, fd: int, dtype: np.dtype, n: int, writable: bool) -> None:
        if n:
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            m = _Map(fd, n * dtype.itemsize, access=access)
            st = os.fstat(fd)
            m.inode = (st.st_dev, st.st_ino)
            self.array = np.frombuffer(m, dtype=dtype, count=n)
            m.addr = self.array.__array_interface__["data"][0]
        else:
            self.array = np.zeros(0, dtype=dtype)
        if not writable:
            self.array.flags.writeable = False

    @classmethod
    def create(cls, path: Path, dtype, n: int) -> RowFile:
        """A new file of ``n`` zeros at ``path`` (replacing one there: a mapping of the old file keeps it)."""
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _reserve(fd, n * np.dtype(dtype).itemsize, path)
            os.replace(tmp, path)
            return cls(fd, np.dtype(dtype), n, True)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)  # the mapping keeps its own reference to the file

    @classmethod
    def open(cls, path: Path, dtype, n: int | None = None) -> RowFile:
        """The file at ``path``, read-only (``n``: the rows it must hold; a shorter or longer file is refused)."""
        path = Path(path)
        itemsize = np.dtype(dtype).itemsize
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size % itemsize or (n is not None and size != n * itemsize):
                raise ValueError(f"{path} holds {size} bytes, not {n if n is not None else 'whole'} {dtype} rows")
            return cls(fd, np.dtype(dtype), size // itemsize, False)
        finally:
            os.close(fd)

    @classmethod
    def scratch(cls, folder: Path, dtype, n: int) -> RowFile:
        """``n`` zeros in a file of ``folder`` that has no name: nothing is left behind when the process ends."""
        with tempfile.TemporaryFile(dir=folder) as f:
            _reserve(f.fileno(), n * np.dtype(dtype).itemsize, Path(folder) / "(a file without a name)")
            return cls(f.fileno(), np.dtype(dtype), n, True)


def _reserve(fd: int, size: int, path: Path) -> None:
    """Give the file ``size`` bytes of disk now (``posix_fallocate``): a mapped page written later can then never
    find the disk full, which would kill the process (``SIGBUS``) instead of raising an error."""
    if not size:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PermanentError(
                f"no room on disk for {path} ({size / 2**20:.1f} MB of the job's per-row state): free space on "
                "that disk, then rerun the same command (it resumes)"
            ) from e
        raise


def _advise(m: mmap.mmap, start: int, end: int) -> None:
    start, end = (max(0, start) // _PAGE) * _PAGE, min(len(m), end)
    if end > start:
        try:
            m.madvise(mmap.MADV_DONTNEED, start, end - start)
        except OSError:  # only a hint: the pages stay mapped, nothing is lost
            pass


def _map_of(arr: np.ndarray) -> _Map | None:
    base: object = arr
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, _Map) else None


def backing(arr: np.ndarray) -> tuple[int, int] | None:
    """The (device, inode) of the file ``arr`` is mapped from (by ``RowFile``), or None for an array in memory."""
    m = _map_of(arr)
    return m.inode if m is not None else None


def release(arr: np.ndarray) -> None:
    """Unmap the pages under ``arr`` (a ``RowFile``'s array or a slice of one; nothing for an array in memory)."""
    m = _map_of(arr)
    if m is None or not arr.size:
        return
    start = arr.__array_interface__["data"][0] - m.addr
    _advise(m, start, start + arr.nbytes)  # arr is contiguous: a RowFile's array, or a slice of it


def blocks(arr: np.ndarray, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, arr[start:start + k])`` over ``arr`` (1-D), a block of about ``block_bytes`` at a time; a block of
    a ``RowFile`` is released once the caller has moved on to the next one."""
    step = max(1, block_bytes // max(1, arr.itemsize))
    for start in range(0, len(arr), step):
        block = arr[start : start + step]
        yield start, block
        release(block)


def store(path: Path, arr: np.ndarray) -> None:
    """Make ``path`` hold ``arr``'s rows, raw: flushed in place when ``arr`` is mapped from the start of that very
    file (what a streaming job wrote there), else written a block at a time to a new file put in its place."""
    path = Path(path)
    m = _map_of(arr)
    if m is not None and arr.__array_interface__["data"][0] == m.addr:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == m.inode:
            if not m.closed and arr.flags.writeable:
                m.flush()
            return
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for _, block in blocks(np.ascontiguousarray(arr).reshape(-1)):
            f.write(block.tobytes())
    os.replace(tmp, path)


def equal(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.array_equal`` for per-row arrays, a block at a time (true at once for two views of the same rows)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.strides == b.strides:
        return True
    for start, x in blocks(a):
        y = b[start : start + len(x)]
        same = np.array_equal(x, y)
        release(y)
        if not same:
            release(x)  # the walk stops here: its last block is not released by ``blocks``
            return False
    return True
