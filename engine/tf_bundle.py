"""Read Google's TensorFlow BERT checkpoints (tensor bundle V2) without TensorFlow.

A checkpoint ``folder/bert_model.ckpt`` is a *prefix* naming two kinds of file:

``bert_model.ckpt.index``
    A LevelDB-format SSTable mapping key -> value, keys sorted bytewise.  From the end:
    a 48-byte footer = two BlockHandles (metaindex, index; each two varint64s: offset,
    size) zero-padded to 40 bytes, then the fixed64 magic 0xdb4775248b80fb57.  A block is
    ``contents + 1-byte compression type + fixed32 masked crc32c(contents + type)``.
    Block contents are entries ``varint32 shared, varint32 non_shared, varint32
    value_len, key[shared:], value`` - each key reuses the first ``shared`` bytes of the
    previous one - followed by the restart array (uint32 offsets) and its uint32 count.
    The index block's values are BlockHandles of the data blocks; the metaindex is empty.
``bert_model.ckpt.data-00000-of-00001`` (one file per shard)
    Raw tensor bytes back to back, in the checkpoint's byte order.

In the table, key ``""`` holds a BundleHeaderProto (num_shards=1, endianness=2: 0 little,
1 big) and every other key is a tensor name whose value is a BundleEntryProto: dtype=1,
shape=2 (TensorShapeProto, dim=2 {size=1}), shard_id=3, offset=4, size=5, crc32c=6
(fixed32, masked) and slices=7 (only for partitioned variables, which BERT never has).
Those few protobuf fields are decoded here by hand, so neither TensorFlow nor protobuf
is needed.  Tensors that are not numbers (DT_STRING, ...) are skipped, not read.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from core.errors import CheckpointError

__all__ = ["read_tf_checkpoint", "TFCheckpointMissingError", "TFCheckpointFormatError"]

BERT_FOLDER_HINT = (
    "a TF BERT folder must contain bert_config.json, bert_model.ckpt.index, "
    "bert_model.ckpt.data-00000-of-00001 and vocab.txt"
)
_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
# TF DataType enum -> numpy dtype in the file (bfloat16 is read as raw uint16).
_DTYPES = {1: "f4", 2: "f8", 3: "i4", 9: "i8", 19: "f2", 14: "u2"}
_DTYPE_NAMES = {4: "uint8", 5: "int16", 6: "int8", 7: "string", 8: "complex64", 10: "bool"}


class TFCheckpointMissingError(CheckpointError, FileNotFoundError):
    """The .index file or a data shard of the checkpoint does not exist."""


class TFCheckpointFormatError(CheckpointError, ValueError):
    """A checkpoint file exists but is damaged or in a form this reader cannot decode."""


# --- protobuf wire format: just what BundleHeaderProto / BundleEntryProto need ----------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``buf[pos]``; return (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise TFCheckpointFormatError("truncated varint")
        byte, pos = buf[pos], pos + 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise TFCheckpointFormatError("varint longer than 10 bytes")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, int or bytes) for each field of a serialized protobuf message."""
    pos = 0
    value: int | bytes
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise TFCheckpointFormatError("truncated fixed-width protobuf field")
            value, pos = int.from_bytes(buf[pos : pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise TFCheckpointFormatError("truncated length-delimited protobuf field")
            value, pos = bytes(buf[pos : pos + length]), pos + length
        else:
            raise TFCheckpointFormatError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _int_field(value: int | bytes) -> int:
    if not isinstance(value, int):
        raise TFCheckpointFormatError("length-delimited protobuf field where an integer was expected")
    return value


def _message_field(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise TFCheckpointFormatError("integer protobuf field where a message was expected")
    return value


def _parse_entry(buf: bytes) -> dict:
    """BundleEntryProto -> dict(dtype, shape, shard_id, offset, size, crc32c, sliced)."""
    entry = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": None, "sliced": False}
    for field, value in _parse_fields(buf):
        if field == 1:
            entry["dtype"] = value
        elif field == 2:  # TensorShapeProto: dim=2 {size=1}
            dims = [dim for f, dim in _parse_fields(_message_field(value)) if f == 2]
            entry["shape"] = tuple(
                _signed64(_int_field(dict(_parse_fields(_message_field(d))).get(1, 0))) for d in dims
            )
        elif field in (3, 4, 5, 6):
            entry[{3: "shard_id", 4: "offset", 5: "size", 6: "crc32c"}[field]] = value
        elif field == 7:  # TensorSliceProto: a partitioned variable, stored piecewise
            entry["sliced"] = True
    return entry


# --- crc32c (Castagnoli), vectorised with numpy ------------------------------------------

_CRC_TABLE = np.arange(256, dtype=np.uint32)  # reflected polynomial 0x82F63B78
for _ in range(8):
    _CRC_TABLE = np.where(_CRC_TABLE & 1, (_CRC_TABLE >> 1) ^ np.uint32(0x82F63B78), _CRC_TABLE >> 1)
_CRC_TABLE_PY = [int(x) for x in _CRC_TABLE]
_CHUNK = 4096


@functools.cache
def _zero_shift_tables() -> list[list[int]]:
    """The linear map 'run the register over _CHUNK zero bytes', as 4 byte-lookup tables."""
    basis = np.uint32(1) << np.arange(32, dtype=np.uint32)  # images of the 32 unit vectors
    for _ in range(_CHUNK):
        basis = _CRC_TABLE[basis & 0xFF] ^ (basis >> 8)
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
    return [np.bitwise_xor.reduce(bits * basis[8 * k : 8 * k + 8].astype(np.int64), axis=1).tolist() for k in range(4)]


def _crc32c(data: bytes | memoryview) -> int:
    """Standard crc32c.  Long inputs are cut into _CHUNK-byte rows whose raw CRCs numpy
    computes side by side; the row CRCs are then folded together with _zero_shift_tables:
    raw_crc(A + B) = shift_len(B)(raw_crc(A)) ^ raw_crc(B) when the register starts at 0."""
    table = _CRC_TABLE_PY
    if len(data) < 16 * _CHUNK:
        crc = 0xFFFFFFFF
        for byte in bytes(data):
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    arr = np.frombuffer(data, dtype=np.uint8)
    # Starting the register at ~0 is the same as starting at 0 with the first 4 bytes
    # inverted; leading zero bytes do not change a register that starts at 0.
    pad = -len(arr) % _CHUNK
    rows: np.ndarray = np.zeros(pad + len(arr), dtype=np.uint8)
    rows[pad:] = arr
    rows[pad : pad + 4] ^= 0xFF
    rows = rows.reshape(-1, _CHUNK)
    state = np.zeros(len(rows), dtype=np.uint32)
    for j in range(_CHUNK):
        state = _CRC_TABLE[(state ^ rows[:, j]) & 0xFF] ^ (state >> 8)
    t0, t1, t2, t3 = _zero_shift_tables()
    crc = 0
    for row_crc in state.tolist():
        crc = t0[crc & 0xFF] ^ t1[(crc >> 8) & 0xFF] ^ t2[(crc >> 16) & 0xFF] ^ t3[crc >> 24] ^ row_crc
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes | memoryview) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- the SSTable --------------------------------------------------------------------------


def _read_block(table: bytes, handle: bytes, where: str) -> bytes:
    offset, pos = _read_varint(handle, 0)
    size, _ = _read_varint(handle, pos)
    end = offset + size
    if end + 5 > len(table):
        raise TFCheckpointFormatError(f"{where}: block at {offset}+{size} runs past the end")
    kind = table[end]  # leveldb: 0 = uncompressed, which TF always writes; 1 = snappy
    if kind != 0:
        raise TFCheckpointFormatError(
            f"{where}: block compressed as {'snappy' if kind == 1 else f'type {kind}'}, which "
            "this reader does not support (TensorFlow writes bundles uncompressed)"
        )
    (stored,) = struct.unpack_from("<I", table, end + 1)
    if _masked_crc32c(table[offset : end + 1]) != stored:
        raise TFCheckpointFormatError(f"{where}: block at {offset} fails its crc32c check")
    return table[offset:end]


def _block_entries(block: bytes, where: str) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) of a block, undoing the prefix compression of its keys."""
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0] if len(block) >= 4 else 0
    limit = len(block) - 4 * (num_restarts + 1)  # entries end where the restart array starts
    if limit < 0:
        raise TFCheckpointFormatError(f"{where}: block with a bad restart array")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _read_varint(block, pos)
        unshared, pos = _read_varint(block, pos)
        value_len, pos = _read_varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise TFCheckpointFormatError(f"{where}: corrupt block entry at {pos}")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _table_items(table: bytes, where: str) -> Iterator[tuple[bytes, bytes]]:
    if len(table) < _FOOTER_LEN:
        raise TFCheckpointFormatError(f"{where}: {len(table)} bytes is too short for an SSTable")
    footer = table[-_FOOTER_LEN:]
    if int.from_bytes(footer[40:], "little") != _MAGIC:
        raise TFCheckpointFormatError(
            f"{where}: bad magic number, not a TF V2 checkpoint index (truncated or not a checkpoint)"
        )
    _, pos = _read_varint(footer, 0)  # skip metaindex offset
    _, pos = _read_varint(footer, pos)  # ... and size
    index = _read_block(table, footer[pos:40], where)
    for _, handle in _block_entries(index, where):
        yield from _block_entries(_read_block(table, handle, where), where)


# --- the public reader ------------------------------------------------------------------------


def _normalise_prefix(prefix: str | Path) -> Path:
    """Accept ``folder/bert_model.ckpt``, its .index or a data file, or a BERT folder."""
    path = Path(prefix)
    path = path / "bert_model.ckpt" if path.is_dir() else path
    return path.with_name(re.sub(r"\.(index|data-\d{5}-of-\d{5})$", "", path.name))


def read_tf_checkpoint(
    prefix: str | Path, names: Iterable[str] | None = None, verify_crc: bool = False, skipped: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Load the numeric tensors of a TF V2 checkpoint as {variable name: numpy array}.

    ``names`` restricts reading to those tensors (KeyError if one is absent).  Tensors of
    other dtypes (DT_STRING, bool, ...) and partitioned ones are left out; pass a list as
    ``skipped`` to have "name (reason)" appended for each.  bfloat16 comes back as float32.
    ``verify_crc`` checks every tensor against its stored crc32c (slow on large checkpoints).
    """
    prefix = _normalise_prefix(prefix)
    index_path = prefix.with_name(prefix.name + ".index")
    if not index_path.is_file():
        v1 = " (a V1 checkpoint? those are not supported)" if prefix.is_file() else ""
        raise TFCheckpointMissingError(f"checkpoint index {index_path} not found{v1}; {BERT_FOLDER_HINT}")
    items = _table_items(index_path.read_bytes(), str(index_path))
    first = next(items, None)
    if first is None or first[0] != b"":
        raise TFCheckpointFormatError(f"{index_path}: no bundle header (empty key)")
    header = dict(_parse_fields(first[1]))  # num_shards=1, endianness=2 (0 little, 1 big)
    num_shards, byte_order = _int_field(header.get(1, 1)), ">" if header.get(2, 0) == 1 else "<"

    wanted = None if names is None else set(names)
    plan = [(key.decode("utf-8"), value) for key, value in items if wanted is None or key.decode("utf-8") in wanted]
    missing = (wanted or set()) - {name for name, _ in plan}
    if missing:
        raise KeyError(f"{index_path}: no tensor named {', '.join(sorted(missing))}")

    tensors: dict[str, np.ndarray] = {}
    with ExitStack() as stack:
        files = {}  # shard id -> open data file
        for name, value in plan:
            entry = _parse_entry(value)
            code, shape, size = entry["dtype"], entry["shape"], entry["size"]
            if entry["sliced"] or code not in _DTYPES:
                if skipped is not None:
                    skipped.append(
                        f"{name} (partitioned)"
                        if entry["sliced"]
                        else f"{name} (dtype {_DTYPE_NAMES.get(code, code)} is not supported)"
                    )
                continue
            dtype = np.dtype(byte_order + _DTYPES[code])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if nbytes < 0 or size != nbytes:
                raise TFCheckpointFormatError(
                    f"{index_path}: tensor {name!r} has shape {shape} "
                    f"({nbytes} bytes of {dtype.name}) but its entry "
                    f"says {size} bytes"
                )
            shard = entry["shard_id"]
            if shard not in files:
                path = prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}")
                if not path.is_file():
                    raise TFCheckpointMissingError(
                        f"checkpoint data shard {path} not found (needed for {name!r}); {BERT_FOLDER_HINT}"
                    )
                files[shard] = stack.enter_context(path.open("rb"))
            f = files[shard]
            f.seek(entry["offset"])
            raw = f.read(size)
            if len(raw) != size:
                raise TFCheckpointFormatError(f"{f.name}: tensor {name!r} is cut short ({len(raw)} of {size} bytes)")
            if verify_crc and entry["crc32c"] is not None and _masked_crc32c(raw) != entry["crc32c"]:
                raise TFCheckpointFormatError(f"{f.name}: tensor {name!r} fails its crc32c check")
            array = np.frombuffer(raw, dtype=dtype).reshape(shape)
            if code == 14:  # DT_BFLOAT16 is the high half of a float32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            tensors[name] = array.astype(array.dtype.newbyteorder("="))  # writable, native order
    return tensors
