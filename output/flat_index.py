"""``index.faiss`` for a flat index, written part by part while the job runs, hashed as it is written.

FAISS stores ``IndexIDMap2(IndexFlatIP(d))`` as three runs of bytes:

    prefix   "IxM2" + header(d, n) + "IxFI" + header(d, n) + uint64 n*d      (82 bytes)
    vectors  n x d float32, in the order they were added
    ids      uint64 n + n int64 ids

where header(d, n) is ``int32 d, int64 n, int64 2**20, int64 2**20, uint8 is_trained, int32 metric``.
Only the prefix depends on the final count, and it has a fixed size: so the vectors can go to the file
as each part is checked (during the job, on finalize's ledger thread) and finalize only writes the
prefix and the ids, instead of writing and hashing the whole index at the end (about 600 MB for
200,000 vectors of 768).

The SHA-256 in the manifest is of the whole file, prefix first, so it is computed ahead on the count
the plan expects (``expect``: the planned rows; workers quarantine a few rows only on bad input). When
the count differs at the end, the prefix is rewritten and the file hashed again from the start.

``layout_matches`` checks these bytes against FAISS's own writer, once per dimension; when a FAISS
version writes something else, finalize builds the index in memory and lets FAISS write it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import queue
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from core.formats import narrow_rows
from core.layout import OutputDir, drop_cached

__all__ = ["FlatIndexFile", "layout_matches", "pwrite_all", "pread_blocks", "write_back", "PREFIX_BYTES", "SYNC_BYTES"]

_DUMMY = 1 << 20  # two int64 fields FAISS writes with this value and ignores on read
_METRIC_IP = 0  # faiss.METRIC_INNER_PRODUCT
PREFIX_BYTES = 2 * (4 + 33) + 8
SYNC_BYTES = 64 << 20  # write back to disk every 64 MB, so the final fsync has little left to write
_READ_BYTES = 8 << 20
_ID_BLOCK = 1 << 19  # ids a commit copies from the id file at a time (4 MB)
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4  # sync_file_range(2) flags
_WAIT_ALL = _WAIT_BEFORE | _WRITE | _WAIT_AFTER


def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), which Python's ``os`` lacks, or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_RANGE = _sync_file_range()


def _range_sync(fd: int, offset: int, length: int, flags: int) -> bool:
    """``sync_file_range``; False where it is missing or the file system refuses it (the caller then syncs
    the whole file); raises ``OSError`` on an I/O error."""
    if _SYNC_RANGE is None:
        return False
    if _SYNC_RANGE(fd, offset, length, flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"sync_file_range: {os.strerror(err)}")


def write_back(fd: int, written: int, flushing: int, end: int) -> tuple[int, int]:
    """For a file written in order: bytes before ``written`` are on disk and dropped from the cache, those in
    ``[written, flushing)`` on their way. Start writing ``[flushing, end)`` without waiting, wait for the window
    before it and let its pages go; returns the new ``(written, flushing)``. Where ``sync_file_range`` is
    missing or refused, ``fdatasync``. Raises ``OSError`` on an I/O error."""
    if not _range_sync(fd, flushing, end - flushing, _WRITE):
        os.fdatasync(fd)
    elif not _range_sync(fd, written, flushing - written, _WAIT_ALL):
        os.fdatasync(fd)
    elif flushing > written:
        drop_cached(fd, written, flushing - written)
    return flushing, end


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def pread_blocks(fd: int, start: int, end: int, block: int, name: object) -> Iterator[bytes]:
    """Bytes ``start .. end - 1`` of ``fd``, ``block`` bytes at a time at most; a file that ends sooner is an
    ``OSError`` naming it (``name``)."""
    pos = start
    while pos < end:
        data = os.pread(fd, min(block, end - pos), pos)
        if not data:
            raise OSError(f"{name} is shorter than the {end:,} bytes written to it")
        yield data
        pos += len(data)


def _prefix(dim: int, n: int) -> bytes:
    header = struct.pack("<iqqq?i", dim, n, _DUMMY, _DUMMY, True, _METRIC_IP)
    return b"IxM2" + header + b"IxFI" + header + struct.pack("<Q", n * dim)


def _ids_bytes(ids: np.ndarray) -> bytes:
    """Row ids (kept in 4 or 8 bytes) as FAISS's id vector holds them: 8 bytes each, little-endian."""
    return ids.astype("<i8").tobytes()


@functools.cache
def layout_matches(dim: int) -> bool:
    """Whether the installed FAISS writes a flat ``IndexIDMap2`` of ``dim`` exactly as this module does."""
    import faiss

    rng = np.random.default_rng(dim)
    vecs = rng.standard_normal((3, dim)).astype(np.float32)
    ids = np.array([5, 0, 2**40], np.int64)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index.add_with_ids(vecs, ids)
    ours = (
        _prefix(dim, 3) + vecs.tobytes() + struct.pack("<Q", 3) + _ids_bytes(narrow_rows(ids[:2])) + _ids_bytes(ids[2:])
    )
    return faiss.serialize_index(index).tobytes() == ours


class FlatIndexFile:
    """A flat index being written to ``<final>.tmp-<host>-<pid>-<random>`` (``final``'s folder), vectors
    appended as they arrive. Used by one thread at a time. ``commit`` finishes it and puts it in place.

    Every write goes to its place in the file (``pwrite``) and a part counts only once its vectors are written
    (and synced, when a sync is due): an append that fails midway changes nothing that is counted, and the same
    part appended again overwrites what the failed one left."""

    def __init__(self, final: Path, dim: int) -> None:
        self.final, self.dim = final, dim
        self.tmp = OutputDir.temp_path(final)
        self.n = 0
        self.expected: int | None = None
        self._hash: _Hasher | None = None  # of the bytes so far, with the prefix for ``expected`` rows
        self._written = self._flushing = 0  # bytes up to these offsets are on disk / on their way there
        self.failed = False  # a write-back failed: the file is in doubt
        self._fd: int | None = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:  # the ids go after the vectors, so they wait in a file without a name until commit, not in memory
            self._ids = tempfile.TemporaryFile(dir=final.parent)
        except OSError:
            os.close(self._fd)
            self.tmp.unlink(missing_ok=True)
            raise

    def _end(self) -> int:
        return PREFIX_BYTES + self.n * self.dim * 4

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Append vectors ``[k, dim]`` (float32) with their ids."""
        if vecs.shape != (len(ids), self.dim) or vecs.dtype != np.float32:
            raise ValueError(f"vectors {vecs.shape} {vecs.dtype} for {len(ids)} ids of dim {self.dim}")
        assert self._fd is not None, "add() after commit()"
        id_bytes = _ids_bytes(ids)  # before anything is written
        # ``.data`` is ``memoryview(arr)``; numpy's stubs declare ndarray a Buffer only for Python >= 3.12
        data = np.ascontiguousarray(vecs).reshape(-1).data.cast("B")
        start = self._end()
        pwrite_all(self._fd, data, start)
        pwrite_all(self._ids.fileno(), id_bytes, self.n * 8)
        if start + len(data) - self._flushing >= SYNC_BYTES:
            self._write_back(start + len(data))
        if self._hash is not None:  # from here on nothing can fail: the part is counted
            self._hash.update(data)
        self.n += len(ids)

    def _write_back(self, end: int) -> None:
        """Start writing ``[_flushing, end)`` to disk without waiting for it, then wait for the window before
        it (written meanwhile, as a rule) and let its pages go: the ledger never blocks on a whole window's
        flush, and at most two windows are unwritten at once. Where ``sync_file_range`` is missing or refused
        (not Linux; some file systems), ``fdatasync``. An error sets ``failed``: bytes of parts counted
        already may be lost, so the file must be written again from the start (``PartLedger`` does)."""
        fd = self._fd
        assert fd is not None
        try:
            self._written, self._flushing = write_back(fd, self._written, self._flushing, end)
        except OSError:
            self.failed = True
            raise

    def expect(self, n: int) -> None:
        """Start the hash, for a file of ``n`` vectors: the prefix, then the vectors written so far (read back)."""
        if self.expected is None:
            h = self._hash_from(_prefix(self.dim, n))
            self._hash, self.expected = _Hasher(h), n

    def _hash_from(self, prefix: bytes):
        """SHA-256 of ``prefix`` and the vectors written so far."""
        assert self._fd is not None, "the file is read back only while open"
        h = hashlib.sha256(prefix)
        for block in pread_blocks(self._fd, PREFIX_BYTES, self._end(), _READ_BYTES, self.tmp):
            h.update(block)
        return h

    def commit(self) -> str:
        """Write the prefix and the ids, flush to disk and rename over ``final``; returns the file's SHA-256."""
        prefix = _prefix(self.dim, self.n)
        ahead = self._hash.result() if self._hash is not None else None
        self._hash = None
        h = ahead if self.expected == self.n else self._hash_from(prefix)
        assert h is not None and self._fd is not None, "commit() once; expect() sets the hash with expected"
        end = self._end()
        for block in self._id_vector():
            pwrite_all(self._fd, block, end)
            h.update(block)
            end += len(block)
        self._ids.close()
        os.ftruncate(self._fd, end)  # anything a failed append left beyond the end goes
        pwrite_all(self._fd, prefix, 0)
        os.close(self._fd)
        self._fd = None
        OutputDir.write_atomic(self.final, lambda tmp: os.replace(self.tmp, tmp))  # fsync, then rename
        return h.hexdigest()

    def _id_vector(self) -> Iterator[bytes]:
        """The index's id vector as FAISS writes it: its length, then the ids of ``add`` (8 bytes each), read back
        from the id file ``_ID_BLOCK`` at a time."""
        yield struct.pack("<Q", self.n)
        yield from pread_blocks(self._ids.fileno(), 0, self.n * 8, _ID_BLOCK * 8, "the index's id file")

    def discard(self) -> None:
        """Close and remove the unfinished file (nothing happens after ``commit``)."""
        self._ids.close()
        if self._hash is not None:
            self._hash.cancel()
            self._hash = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.tmp.unlink(missing_ok=True)


class _Hasher:
    """A SHA-256 fed in order on its own thread (``hashlib`` releases the GIL on large buffers), so that hashing
    one part's vectors overlaps writing the next: the ledger's per-part work in order is then the write alone.
    ``update`` keeps a reference to the bytes until they are hashed (the caller must not change them)."""

    def __init__(self, h) -> None:
        self._h = h
        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="index-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._q.get()) is not None:
            if self._error is None and not self._cancelled:
                try:
                    self._h.update(data)
                except BaseException as e:  # noqa: BLE001 - re-raised by result()
                    self._error = e

    def update(self, data: bytes | memoryview) -> None:
        self._q.put(data)

    def result(self):
        """The hash object once every update is in (raises what hashing raised)."""
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._h

    def cancel(self) -> None:
        self._cancelled = True
        self._q.put(None)
        self._thread.join()
