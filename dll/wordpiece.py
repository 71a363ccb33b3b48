"""A BERT WordPiece tokenizer in C (``dll/src/fbas_wordpiece.c``), id for id the same as HF ``tokenizers``.

    tok = make_tokenizer(tokenizer_json, max_seq_len)   # FastTokenizer, or core.tokenize.Tokenizer
    enc = tok.encode(["A man is playing a guitar."])    # core.tokenize.Encoded

``make_tokenizer`` returns a ``FastTokenizer`` when ``dll/build/libfbas_wordpiece.so`` loads (``make setup``
builds it; ``bash dll/build_wordpiece.sh`` rebuilds it) and the ``tokenizer.json`` is a plain BERT one:
``BertNormalizer``, ``BertPreTokenizer``, ``WordPiece``, the ``[CLS] $A [SEP]`` template, and added tokens
matched on the raw text only. Anything else gets HF's tokenizer (``core.tokenize.Tokenizer``, the reference),
with one log line saying why. ``FBAS_WORDPIECE=0`` turns the C tokenizer off.

``FastTokenizer`` has ``Tokenizer``'s interface (``encode``, ``lengths``, ``max_seq_len``, ``cls_id``,
``sep_id``, ``tokens``), plus ``encode_utf8``/``lengths_utf8`` for texts already in one UTF-8 buffer with
int64 byte offsets (an Arrow string array's data and offsets), which make no Python object per text.
The C code is given its Unicode knowledge as tables learnt from HF itself (``dll.wordpiece_tables``).
"""

from __future__ import annotations

import ctypes
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from core.envs import read_env
from core.tokenize import Encoded, Tokenizer
from dll.wordpiece_tables import NormalizerFlags, tables_for

logger = logging.getLogger(__name__)

__all__ = ["FastTokenizer", "make_tokenizer", "load_library", "plain_bert", "LIB_PATH"]

LIB_PATH = Path(__file__).resolve().parent / "build" / "libfbas_wordpiece.so"
ABI_VERSION = 1
_ERRORS = {-2: "bad arguments", -3: "out of memory", -4: "output capacity exceeded"}
_lib: list[Any] = []  # [] not tried yet; [None] unavailable; [CDLL] loaded


def load_library(path: Path | None = None) -> Any:
    """The ctypes library (cached), or None when it is absent or does not load (logged once)."""
    if path is None and _lib:
        return _lib[0]
    target = path or LIB_PATH
    lib = None
    try:
        lib = ctypes.CDLL(str(target))
        lib.fbas_wp_abi_version.restype = ctypes.c_int
        if lib.fbas_wp_abi_version() != ABI_VERSION:
            raise OSError(f"ABI {lib.fbas_wp_abi_version()}, this fbas needs {ABI_VERSION}: rebuild it")
        vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        lib.fbas_wp_new.restype = vp
        lib.fbas_wp_new.argtypes = [vp, vp, i64, vp, vp, ctypes.c_int, vp, vp, vp, i64, vp, i32, vp, vp, vp, i32]
        lib.fbas_wp_new.argtypes += [i32, i32, i32, i32]
        lib.fbas_wp_free.restype = None
        lib.fbas_wp_free.argtypes = [vp]
        lib.fbas_wp_encode.restype = i64
        lib.fbas_wp_encode.argtypes = [vp, vp, i64, vp, i64, i32, vp, vp, vp, vp, i32]
    except (OSError, AttributeError) as e:
        logger.info("C WordPiece tokenizer unavailable (%s: %s); using HF tokenizers", target, e)
        lib = None
    if path is None:
        _lib.append(lib)
    return lib


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def plain_bert(config: dict) -> str | None:
    """Why a parsed ``tokenizer.json`` is not one the C tokenizer reproduces exactly, or None when it is."""
    norm, pre, model, post = (config.get(k) or {} for k in ("normalizer", "pre_tokenizer", "model", "post_processor"))
    if norm.get("type") != "BertNormalizer":
        return f"normalizer {norm.get('type')!r}, not BertNormalizer"
    if pre.get("type") != "BertPreTokenizer":
        return f"pre-tokenizer {pre.get('type')!r}, not BertPreTokenizer"
    if model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
        return f"model {model.get('type')!r}, not WordPiece"
    if model.get("unk_token") not in model["vocab"]:
        return "the vocabulary lacks its unk_token"
    if post.get("type") != "TemplateProcessing":
        return f"post-processor {post.get('type')!r}, not TemplateProcessing"
    single = post.get("single") or []
    shape = [next(iter(step)) for step in single]
    if shape != ["SpecialToken", "Sequence", "SpecialToken"] or single[1]["Sequence"]["id"] != "A":
        return "the single-sequence template is not [CLS] $A [SEP]"
    for step in (single[0], single[2]):
        name = step["SpecialToken"]["id"]
        if len((post.get("special_tokens") or {}).get(name, {}).get("ids", [])) != 1:
            return f"template token {name!r} is not one id"
    for tok in config.get("added_tokens") or []:
        if tok.get("normalized") or tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word"):
            return f"added token {tok.get('content')!r} is matched after normalization or with stripping"
        if not tok.get("content"):
            return "an added token is empty"
    return None


class FastTokenizer:
    """``core.tokenize.Tokenizer``'s contract, computed by ``libfbas_wordpiece.so``; ``threads`` splits each
    batch over that many C threads (1 suits worker pools, which are processes)."""

    def __init__(self, tokenizer_json: str, max_seq_len: int, threads: int = 1, lib: Any = None) -> None:
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be at least 1, not {max_seq_len}")
        config = json.loads(tokenizer_json)
        why = plain_bert(config)
        if why:
            raise ValueError(f"not a plain BERT WordPiece tokenizer.json: {why}")
        self._lib = lib or load_library()
        if self._lib is None:
            raise OSError(f"{LIB_PATH} is not built or does not load")
        self._json = tokenizer_json
        self._reference: Tokenizer | None = None
        self.max_seq_len = max_seq_len
        self.threads = max(1, threads)
        norm, model, post = config["normalizer"], config["model"], config["post_processor"]
        single = post["single"]
        specials = post["special_tokens"]
        self.cls_id = int(specials[single[0]["SpecialToken"]["id"]]["ids"][0])
        self.sep_id = int(specials[single[2]["SpecialToken"]["id"]]["ids"][0])
        flags = NormalizerFlags(
            bool(norm.get("clean_text", True)),
            bool(norm.get("handle_chinese_chars", True)),
            norm.get("strip_accents"),
            bool(norm.get("lowercase", True)),
        )
        self._tables = tables_for(flags)
        vocab: dict[str, int] = model["vocab"]
        words = [w.encode("utf-8") for w in vocab]
        v_blob = np.frombuffer(b"".join(words) or b"\0", np.uint8)
        v_off = np.zeros(len(words) + 1, np.int64)
        np.cumsum([len(w) for w in words], out=v_off[1:])
        v_ids = np.fromiter(vocab.values(), np.int32, count=len(vocab))
        added = [(t["content"].encode("utf-8"), int(t["id"])) for t in config.get("added_tokens") or []]
        a_blob = np.frombuffer(b"".join(a for a, _ in added) or b"\0", np.uint8)
        a_off = np.zeros(len(added) + 1, np.int64)
        np.cumsum([len(a) for a, _ in added], out=a_off[1:])
        a_ids = np.array([i for _, i in added] or [0], np.int32)
        prefix = str(model.get("continuing_subword_prefix") or "").encode("utf-8")
        t = self._tables
        handle = self._lib.fbas_wp_new(
            _ptr(t.map),
            _ptr(t.pool) if len(t.pool) else None,
            len(t.pool),
            _ptr(t.flags),
            _ptr(t.rank),
            int(t.reorders),
            _ptr(v_blob),
            _ptr(v_off),
            _ptr(v_ids),
            len(words),
            prefix or None,
            len(prefix),
            _ptr(a_blob),
            _ptr(a_off),
            _ptr(a_ids),
            len(added),
            int(vocab[model["unk_token"]]),
            self.cls_id,
            self.sep_id,
            int(model.get("max_input_chars_per_word", 100)),
        )
        if not handle:
            raise RuntimeError("libfbas_wordpiece refused the tokenizer's tables")
        self._handle = handle

    def __del__(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self._lib.fbas_wp_free(handle)

    def _run(self, buf: Any, offsets: np.ndarray, ids: bool) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        data = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf.view(np.uint8).ravel()
        offs = np.ascontiguousarray(offsets, dtype=np.int64)
        n = len(offs) - 1
        if n < 0:
            raise ValueError("offsets needs one more entry than there are texts")
        lengths = np.empty(n, np.int32)
        full = np.empty(n, np.int32)
        out = slots = None
        if ids:
            # every input byte yields at most max_tokens_per_byte pieces; [CLS] and [SEP] come on top
            per_byte = self._tables.max_tokens_per_byte
            caps = np.minimum(np.ceil(np.diff(offs) * per_byte).astype(np.int64) + 2, self.max_seq_len)
            slots = np.zeros(n + 1, np.int64)
            np.cumsum(caps, out=slots[1:])
            out = np.empty(max(int(slots[-1]), 1), np.int32)
        got = self._lib.fbas_wp_encode(
            self._handle,
            _ptr(data) if len(data) else None,
            len(data),
            _ptr(offs),
            n,
            self.max_seq_len,
            _ptr(out),
            _ptr(slots),
            _ptr(lengths),
            _ptr(full),
            self.threads,
        )
        if got < 0:
            raise RuntimeError(f"libfbas_wordpiece: {_ERRORS.get(got, got)}")
        if out is not None:
            out = out[:got].copy() if got < len(out) // 2 else out[:got]
        return out, lengths, full

    @staticmethod
    def _pack(texts: list[str]) -> tuple[bytes, np.ndarray]:
        encoded = [t.encode("utf-8") for t in texts]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, count=len(encoded)), out=offsets[1:])
        return b"".join(encoded), offsets

    def encode_utf8(self, buf: Any, offsets: np.ndarray) -> Encoded:
        """Tokenize texts held in one UTF-8 buffer: text i is ``buf[offsets[i]:offsets[i+1]]`` (bytes)."""
        ids, lengths, full = self._run(buf, offsets, ids=True)
        assert ids is not None
        return Encoded(ids, lengths, full > lengths, full)

    def lengths_utf8(self, buf: Any, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(int32 tokens per text after truncation, int32 tokens without it) for texts in one UTF-8 buffer."""
        _, lengths, full = self._run(buf, offsets, ids=False)
        return lengths, full

    def encode(self, texts: list[str]) -> Encoded:
        """Tokenize a batch, as ``core.tokenize.Tokenizer.encode`` does."""
        return self.encode_utf8(*self._pack(texts))

    def lengths(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(int32 tokens per text after truncation, int32 tokens without it), as ``Tokenizer.lengths``."""
        return self.lengths_utf8(*self._pack(texts))

    def tokens(self, text: str) -> list[str]:
        """Word pieces of one text, without specials (HF's answer: for debugging and tests)."""
        if self._reference is None:
            self._reference = Tokenizer(self._json, self.max_seq_len)
        return self._reference.tokens(text)


def make_tokenizer(tokenizer_json: str, max_seq_len: int, threads: int = 1) -> Tokenizer | FastTokenizer:
    """The C tokenizer where it applies and loads, else HF's (``core.tokenize.Tokenizer``)."""
    if read_env().get("wordpiece", "1").strip().lower() in ("0", "false", "no", "off"):
        logger.debug("FBAS_WORDPIECE is off: using HF tokenizers")
        return Tokenizer(tokenizer_json, max_seq_len)
    why = plain_bert(json.loads(tokenizer_json))
    if why:
        logger.debug("using HF tokenizers: %s", why)
        return Tokenizer(tokenizer_json, max_seq_len)
    if load_library() is None:
        return Tokenizer(tokenizer_json, max_seq_len)
    try:
        return FastTokenizer(tokenizer_json, max_seq_len, threads=threads)
    except (OSError, RuntimeError, ValueError) as e:
        logger.warning("C WordPiece tokenizer failed to start (%s); using HF tokenizers", e)
        return Tokenizer(tokenizer_json, max_seq_len)
