"""Id keys: a 64-bit key per input id (``id_hashes``), how finalize checks that every committed row carries
the id of its input row without keeping the ids themselves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from core.errors import InputError

__all__ = ["id_hashes"]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


_P = np.uint64(0x100000001B3)
_MAX_SPREAD = 1024  # ids whose lengths differ by more take the other (slower) way


def _by_position(offsets: np.ndarray, data: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each string's polynomial ``sum((byte + 1) * P**(bytes after it))`` mod 2**64, by Horner's rule one byte
    position at a time over every string still that long (2.15 M ids of 10-12 bytes: 0.14 s, 18x ``_by_powers``,
    which makes several 8-byte temporaries per byte)."""
    starts, h = offsets[:-1], np.zeros(len(lengths), dtype=np.uint64)
    if not len(lengths):
        return h
    lo, hi = int(lengths.min()), int(lengths.max())
    with np.errstate(over="ignore"):
        for k in range(lo):  # every string has a byte here
            h *= _P
            h += data[starts + k]
            h += np.uint64(1)
        idx = None
        for k in range(lo, hi):
            idx = np.flatnonzero(lengths > k) if idx is None else idx[lengths[idx] > k]
            hk = h[idx] * _P
            hk += data[starts[idx] + k]
            hk += np.uint64(1)
            h[idx] = hk
    return h


def _by_powers(offsets: np.ndarray, data: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The same sums as ``_by_position``, every byte at once (for ids of very different lengths)."""
    count = len(lengths)
    start = int(offsets[0])
    data = data[start : int(offsets[-1])].astype(np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    if data.size:
        owner = np.repeat(np.arange(count), lengths)
        from_end = (offsets[1:] - start)[owner] - 1 - np.arange(data.size)  # 0 for each string's last byte
        maxlen = int(lengths.max())
        powers = np.empty(maxlen, dtype=np.uint64)
        powers[0] = 1
        with np.errstate(over="ignore"):
            for k in range(1, maxlen):
                powers[k] = powers[k - 1] * _P
            terms = (data + np.uint64(1)) * powers[from_end]
        nonempty = lengths > 0
        sums = np.add.reduceat(terms, (offsets[:-1] - start)[nonempty])
        h[nonempty] = sums
    return h


def id_hashes(arr: pa.Array | pa.ChunkedArray | Sequence | None, row0: int = 0, n: int | None = None) -> np.ndarray:
    """uint64 [n]: a 64-bit key per id. Integer ids map to themselves (no collisions); strings hash their
    UTF-8 bytes (vectorized polynomial hash, then splitmix64); ``None`` means row-position ids."""
    if arr is None:
        return np.arange(row0, row0 + (n or 0), dtype=np.int64).view(np.uint64)
    # pyarrow ships no stubs, so isinstance cannot narrow ``arr``: ``col`` is always an Arrow array
    col: pa.Array = arr if isinstance(arr, (pa.Array, pa.ChunkedArray)) else pa.array(list(arr))
    if isinstance(col, pa.ChunkedArray):
        col = pa.concat_arrays(col.chunks) if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        raise InputError(
            f"the id column has {col.null_count} null id(s) (first at row "
            f"{row0 + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])}): every row "
            "needs a unique id; fill them, or drop --id-column to use row positions"
        )
    if pa.types.is_integer(col.type):
        if pa.types.is_unsigned_integer(col.type):
            return col.cast(pa.uint64()).to_numpy().astype(np.uint64)
        return col.cast(pa.int64()).to_numpy().view(np.uint64)
    if not pa.types.is_large_string(col.type):
        col = col.cast(pa.large_string())
    count = len(col)
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset : col.offset + count + 1]
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8) if col.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    spread = int(lengths.max()) - int(lengths.min()) if count else 0
    h = _by_position(offsets, data, lengths) if spread <= _MAX_SPREAD else _by_powers(offsets, data, lengths)
    with np.errstate(over="ignore"):
        h ^= lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return _splitmix64(h)
