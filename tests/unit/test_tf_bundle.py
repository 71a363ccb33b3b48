"""engine.tf_bundle reads TensorFlow V2 checkpoints (BERT) without TensorFlow.

The fixture tests/fixtures/tf_bert_tiny was written by real TensorFlow (see
tests/fixtures/make_tf_checkpoint.py); tf_bert_tiny_expected.npz holds the values TF had.
Other dtypes, shards and byte orders are covered by small bundles built here by hand.
"""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine import tf_bundle  # noqa: E402
from engine.tf_bundle import read_tf_checkpoint  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TINY = FIXTURES / "tf_bert_tiny"
PREFIX = TINY / "bert_model.ckpt"
MAGIC = 0xDB4775248B80FB57


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "tf_bert_tiny_expected.npz") as npz:
        return {name: npz[name] for name in npz.files}


@pytest.fixture
def tiny_copy(tmp_path: Path) -> Path:
    """A copy of the fixture folder that a test may damage; returns the prefix."""
    shutil.copytree(TINY, tmp_path / "bert")
    return tmp_path / "bert" / "bert_model.ckpt"


# --- the real TF checkpoint -------------------------------------------------------------------


def test_reads_every_tensor_exactly_as_tensorflow_saved_it(expected):
    tensors = read_tf_checkpoint(PREFIX, verify_crc=True)
    assert sorted(tensors) == sorted(expected)
    for name, want in expected.items():
        got = tensors[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(got, want), name
    assert tensors["global_step"].dtype == np.int64 and tensors["global_step"].shape == ()
    assert tensors["bert/embeddings/word_embeddings"].shape == (120, 32)  # vocab.txt lines
    assert tensors["bert/encoder/layer_1/intermediate/dense/kernel"].shape == (32, 64)
    assert tensors["cls/predictions/output_bias"].flags.writeable


def test_accepts_folder_index_path_and_str(expected):
    for where in (TINY, str(PREFIX), PREFIX.with_name("bert_model.ckpt.index")):
        assert sorted(read_tf_checkpoint(where)) == sorted(expected)


def test_names_reads_only_those():
    names = ["bert/pooler/dense/kernel", "global_step"]
    tensors = read_tf_checkpoint(PREFIX, names=iter(names))
    assert sorted(tensors) == sorted(names)
    with pytest.raises(KeyError, match="bert/no/such/kernel"):
        read_tf_checkpoint(PREFIX, names=["bert/pooler/dense/kernel", "bert/no/such/kernel"])


def test_missing_data_shard_is_a_clear_error(tiny_copy):
    tiny_copy.with_name("bert_model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(FileNotFoundError, match=r"data-00000-of-00001.*bert_config\.json.*vocab\.txt"):
        read_tf_checkpoint(tiny_copy)


def test_missing_index_is_a_clear_error(tiny_copy):
    tiny_copy.with_name("bert_model.ckpt.index").unlink()
    with pytest.raises(FileNotFoundError, match=r"bert_model\.ckpt\.index.*must contain"):
        read_tf_checkpoint(tiny_copy)


@pytest.mark.parametrize("keep", [0, 20, 47, 500, -1])
def test_truncated_index_is_a_clear_error(tiny_copy, keep):
    index = tiny_copy.with_name("bert_model.ckpt.index")
    index.write_bytes(index.read_bytes()[:keep])
    with pytest.raises(ValueError, match=r"bert_model\.ckpt\.index"):
        read_tf_checkpoint(tiny_copy)


def test_corrupted_index_byte_fails_the_block_crc(tiny_copy):
    index = tiny_copy.with_name("bert_model.ckpt.index")
    raw = bytearray(index.read_bytes())
    raw[100] ^= 0x01  # inside the data block
    index.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="crc32c"):
        read_tf_checkpoint(tiny_copy)


def test_corrupted_data_is_caught_only_with_verify_crc(tiny_copy):
    data = tiny_copy.with_name("bert_model.ckpt.data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0x40
    data.write_bytes(bytes(raw))
    read_tf_checkpoint(tiny_copy)  # not checked by default
    with pytest.raises(ValueError, match="fails its crc32c"):
        read_tf_checkpoint(tiny_copy, verify_crc=True)


def test_truncated_data_shard(tiny_copy):
    data = tiny_copy.with_name("bert_model.ckpt.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut short"):
        read_tf_checkpoint(tiny_copy)


# --- wire format on hand-built bytes ----------------------------------------------------------


def test_varint_decoding():
    assert tf_bundle._read_varint(b"\x00", 0) == (0, 1)
    assert tf_bundle._read_varint(b"\x96\x01", 0) == (150, 2)
    assert tf_bundle._read_varint(b"\xff\xff\xff\xff\x0f", 0) == (0xFFFFFFFF, 5)
    assert tf_bundle._read_varint(b"\x07\xac\x02", 1) == (300, 3)
    minus_one = b"\xff" * 9 + b"\x01"
    assert tf_bundle._signed64(tf_bundle._read_varint(minus_one, 0)[0]) == -1
    with pytest.raises(ValueError, match="truncated"):
        tf_bundle._read_varint(b"\x96", 0)
    with pytest.raises(ValueError, match="longer than 10"):
        tf_bundle._read_varint(b"\xff" * 11, 0)


def test_protobuf_entry_decoding():
    shape = b"\x12\x02\x08\x03" + b"\x12\x03\x08\x80\x06"  # dim {size: 3}, dim {size: 768}
    entry = (
        b"\x08\x01"  # dtype: DT_FLOAT
        + b"\x12"
        + bytes([len(shape)])
        + shape
        + b"\x18\x02"  # shard_id: 2
        + b"\x20\xe8\x07"  # offset: 1000
        + b"\x28\x80\x48"  # size: 9216 = 3 * 768 * 4
        + b"\x35\x78\x56\x34\x12"  # crc32c: fixed32 0x12345678
        + b"\x41"
        + b"\0" * 8
    )  # an unknown fixed64 field is skipped
    assert tf_bundle._parse_entry(entry) == {
        "dtype": 1,
        "shape": (3, 768),
        "shard_id": 2,
        "offset": 1000,
        "size": 9216,
        "crc32c": 0x12345678,
        "sliced": False,
    }
    assert tf_bundle._parse_entry(b"\x08\x09")["shape"] == ()  # scalar
    assert tf_bundle._parse_entry(b"\x3a\x00")["sliced"] is True
    with pytest.raises(ValueError, match="wire type 3"):
        tf_bundle._parse_entry(b"\x0b")
    with pytest.raises(ValueError, match="truncated"):
        tf_bundle._parse_entry(b"\x12\x05\x12")


def test_crc32c_known_values_and_fast_path():
    assert tf_bundle._crc32c(b"123456789") == 0xE3069283
    assert tf_bundle._crc32c(b"") == 0
    data = np.random.RandomState(0).bytes(16 * 4096 + 12345)  # numpy path
    crc = 0xFFFFFFFF
    for byte in data:
        crc = tf_bundle._CRC_TABLE_PY[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    assert tf_bundle._crc32c(data) == crc ^ 0xFFFFFFFF


# --- bundles built by hand: other dtypes, shards, byte order ------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _block(items: list[tuple[bytes, bytes]], restart_interval: int = 2) -> bytes:
    out, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_interval:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        out += key[shared:] + value
        last = key
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))


def _write_bundle(
    prefix: Path,
    tensors: dict,
    shards: int = 1,
    big_endian: bool = False,
    compression: int = 0,
    lie_about_size: str = "",
) -> None:
    """tensors: name -> (TF dtype code, shape, raw bytes); shard = position % shards."""
    files = [bytearray() for _ in range(shards)]
    items = [(b"", _field(1, shards) + _field(2, int(big_endian)))]
    for i, (name, (code, shape, raw)) in enumerate(sorted(tensors.items())):
        shard = files[i % shards]
        dims = b"".join(_field(2, _field(1, d)) for d in shape)
        size = len(raw) + (4 if name == lie_about_size else 0)
        items.append(
            (
                name.encode(),
                _field(1, code) + _field(2, dims) + _field(3, i % shards) + _field(4, len(shard)) + _field(5, size),
            )
        )
        shard += raw
    table = bytearray()

    def put(contents: bytes) -> bytes:
        handle = _varint(len(table)) + _varint(len(contents))
        trailer = bytes([compression])
        table.extend(contents + trailer + struct.pack("<I", tf_bundle._masked_crc32c(contents + trailer)))
        return handle

    data, meta = put(_block(items)), put(_block([]))
    index = put(_block([(items[-1][0], data)]))
    table += (meta + index).ljust(40, b"\0") + struct.pack("<Q", MAGIC)
    prefix.with_name(prefix.name + ".index").write_bytes(bytes(table))
    for n, raw in enumerate(files):
        prefix.with_name(f"{prefix.name}.data-{n:05d}-of-{shards:05d}").write_bytes(bytes(raw))


def _sample(byte_order: str = "<") -> tuple[dict, dict]:
    rng = np.random.RandomState(1)
    want = {
        "f32": rng.randn(2, 3).astype(np.float32),
        "f64": rng.randn(4),
        "i32": np.arange(-3, 3, dtype=np.int32).reshape(3, 2),
        "i64": np.array(2**40, dtype=np.int64),
        "f16": rng.randn(5).astype(np.float16),
        "bf16": np.array([1.0, -2.5, 3.140625, 0.0], dtype=np.float32),
    }
    codes = {"f32": 1, "f64": 2, "i32": 3, "i64": 9, "f16": 19}
    tensors = {
        f"t/{k}": (codes[k], want[k].shape, want[k].astype(want[k].dtype.newbyteorder(byte_order)).tobytes())
        for k in codes
    }
    bf16_bits = (want["bf16"].view(np.uint32) >> 16).astype(np.dtype(byte_order + "u2"))
    tensors["t/bf16"] = (14, (4,), bf16_bits.tobytes())
    tensors["t/str"] = (7, (1,), b"\x05hello")
    return tensors, {f"t/{k}": v for k, v in want.items()}


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_hand_built_bundle_dtypes_shards_and_skips(tmp_path, byte_order):
    tensors, want = _sample(byte_order)
    _write_bundle(tmp_path / "m.ckpt", tensors, shards=3, big_endian=byte_order == ">")
    skipped: list[str] = []
    got = read_tf_checkpoint(tmp_path / "m.ckpt", skipped=skipped)
    assert skipped == ["t/str (dtype string is not supported)"]
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype.newbyteorder("=") and np.array_equal(got[name], value), name


def test_size_mismatch_names_the_tensor(tmp_path):
    tensors, _ = _sample()
    _write_bundle(tmp_path / "m.ckpt", tensors, lie_about_size="t/f64")
    with pytest.raises(ValueError, match="t/f64.*says 36 bytes"):
        read_tf_checkpoint(tmp_path / "m.ckpt")


@pytest.mark.parametrize("compression, word", [(1, "snappy"), (7, "type 7")])
def test_compressed_blocks_are_refused_clearly(tmp_path, compression, word):
    tensors, _ = _sample()
    _write_bundle(tmp_path / "m.ckpt", tensors, compression=compression)
    with pytest.raises(ValueError, match=f"compressed as {word}.*not support"):
        read_tf_checkpoint(tmp_path / "m.ckpt")
