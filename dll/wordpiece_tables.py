"""Per-code-point tables for ``libfbas_wordpiece.so``, learnt by asking Hugging Face ``tokenizers`` itself.

The C tokenizer holds no Unicode data: what each code point normalizes to, and what it is to the
pre-tokenizer, comes from running HF's own ``BertNormalizer`` and ``BertPreTokenizer`` on every Unicode
scalar value (batched, a few seconds), so both agree on the Unicode version by construction. Python's
``unicodedata`` is never consulted (its Unicode version differs from the Rust crates').

``Tables`` (see the C file's header for the encoding):

* ``map`` int32 [0x110000] and ``pool`` uint32: each code point's normalized output;
* ``flags`` uint8 [0x110000]: pre-tokenizer class (0 word char, 1 whitespace, 2 punctuation) and, for
  normalizers that strip accents, bit 2 on code points that vanish yet still stop combining marks from
  reordering across them;
* ``rank`` uint8 [0x110000] (accent-stripping normalizers only): order of each surviving non-starter's
  canonical combining class, learnt from how HF's NFD orders pairs of them.

Tables depend on the normalizer's flags; they are cached in memory and as ``.npz`` files under
``dll/build/wordpiece_tables/``, keyed by the flags and the ``tokenizers`` version.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Tables", "NormalizerFlags", "tables_for", "CACHE_DIR"]

NCP = 0x110000
CACHE_DIR = Path(__file__).resolve().parent / "build" / "wordpiece_tables"
FORMAT = 1
CLS_WS, CLS_PUNCT, FLAG_BLOCK = 1, 2, 4
_SEP = "|@|"  # probe separator: ASCII starters that every BertNormalizer leaves as they are
_CHUNK = 1 << 16
# two non-starters that survive accent stripping (both spacing marks, Mc), with canonical combining
# classes 216 (MUSICAL SYMBOL COMBINING STEM) and 9 (BALINESE ADEG ADEG): probes for who reorders
_HIGH, _LOW = "\U0001d165", "\u1b44"
_memo: dict[tuple, Tables] = {}


@dataclass(frozen=True)
class NormalizerFlags:
    """A ``BertNormalizer``'s settings; ``strip_accents=None`` follows ``lowercase``, as in HF."""

    clean_text: bool
    handle_chinese_chars: bool
    strip_accents: bool | None
    lowercase: bool

    @property
    def reorders(self) -> bool:
        """Whether the normalizer decomposes (NFD), which sorts combining marks: it does to strip accents."""
        return self.lowercase if self.strip_accents is None else self.strip_accents

    def key(self) -> str:
        strip = "n" if self.strip_accents is None else int(self.strip_accents)
        return f"c{int(self.clean_text)}h{int(self.handle_chinese_chars)}s{strip}l{int(self.lowercase)}"


@dataclass
class Tables:
    map: np.ndarray  # int32 [NCP]
    pool: np.ndarray  # uint32
    flags: np.ndarray  # uint8 [NCP]
    rank: np.ndarray  # uint8 [NCP]
    reorders: bool
    max_tokens_per_byte: float  # bound on word pieces per input byte (sizes the output slots)


def _scalars() -> np.ndarray:
    cps = np.arange(NCP, dtype=np.int64)
    return cps[(cps < 0xD800) | (cps > 0xDFFF)]


def _chunks(cps: np.ndarray):
    for i in range(0, len(cps), _CHUNK):
        yield cps[i : i + _CHUNK]


def _normalize_each(normalizer, probes: list[str]) -> list[str]:
    """``normalizer.normalize_str`` of each probe, in one call per chunk (each probe is surrounded by starters)."""
    out = normalizer.normalize_str(_SEP.join(probes)).split(_SEP)
    if len(out) != len(probes):  # a probe's output held the separator: ask one at a time
        out = [normalizer.normalize_str(p) for p in probes]
    return out


def _pretok_classes(cps: np.ndarray) -> np.ndarray:
    """0 word char, 1 whitespace, 2 punctuation: how ``BertPreTokenizer`` splits "a" + c + "a"."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.BertPreTokenizer()
    cls = np.zeros(NCP, np.uint8)
    for chunk in _chunks(cps):
        text = " ".join("a" + chr(c) + "a" for c in chunk.tolist())
        pieces = np.zeros(len(chunk), np.int64)
        for _, (start, _end) in pre.pre_tokenize_str(text):
            pieces[start // 4] += 1
        got = np.full(len(chunk), 255, np.uint8)
        got[pieces == 1] = 0
        got[pieces == 2] = CLS_WS
        got[pieces == 3] = CLS_PUNCT
        if (got == 255).any():
            bad = int(chunk[np.argmax(got == 255)])
            raise RuntimeError(f"BertPreTokenizer split 'a' U+{bad:04X} 'a' in an unexpected way")
        cls[chunk] = got
    return cls


def _pretok_cached(cps: np.ndarray, version: str) -> np.ndarray:
    path = CACHE_DIR / f"pretok-v{FORMAT}-{version}.npy"
    try:
        return np.load(path)
    except (OSError, ValueError):
        pass
    cls = _pretok_classes(cps)
    _save(path, lambda f: np.save(f, cls))
    return cls


def _save(path: Path, write) -> None:
    """Write a cache file atomically; a read-only tree only loses the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from workers running as another user
        os.replace(tmp, path)
    except OSError as e:
        logger.debug("cannot cache %s (%s)", path, e)


def _build(flags: NormalizerFlags, version: str) -> Tables:
    from tokenizers import normalizers

    norm = normalizers.BertNormalizer(
        clean_text=flags.clean_text,
        handle_chinese_chars=flags.handle_chinese_chars,
        strip_accents=flags.strip_accents,
        lowercase=flags.lowercase,
    )
    cps = _scalars()
    cls = _pretok_cached(cps, version)
    outputs: dict[int, str] = {}
    mapping = np.full(NCP, -1, np.int32)
    pool: list[int] = []
    per_byte = 1.0
    for chunk in _chunks(cps):
        clist = chunk.tolist()
        for c, out in zip(clist, _normalize_each(norm, [chr(c) for c in clist])):
            if len(out) == 1:
                mapping[c] = ord(out)
            elif len(out) > 1:
                outputs[c] = out
                mapping[c] = -2 - len(pool)
                pool.append(len(out))
                pool.extend(ord(o) for o in out)
            pieces = sum(1 for o in out if cls[ord(o)] != CLS_WS)
            per_byte = max(per_byte, pieces / len(chr(c).encode("utf-8")))
    # surrogates never come out of the decoder (it gives U+FFFD); map them like U+FFFD all the same
    mapping[0xD800:0xE000] = mapping[0xFFFD]
    cls[0xD800:0xE000] = cls[0xFFFD]
    flag_arr = cls.copy()
    rank = np.zeros(NCP, np.uint8)
    if flags.reorders:
        _learn_reordering(norm, cps, mapping, flag_arr, rank)
    return Tables(mapping, np.asarray(pool, np.uint32), flag_arr, rank, flags.reorders, per_byte)


def _learn_reordering(norm, cps: np.ndarray, mapping: np.ndarray, flags: np.ndarray, rank: np.ndarray) -> None:
    """Find the non-starters that survive normalization and their relative order, and the vanishing code points
    that still block reordering, from how HF's NFD treats them next to two known non-starters."""
    hi, lo = _HIGH, _LOW
    if norm.normalize_str("a" + hi + lo) != "a" + lo + hi:
        raise RuntimeError("the probe non-starters U+1D165 and U+1B44 do not reorder in this tokenizers")
    identity = cps[mapping[cps] == cps]
    nonstarters: list[int] = []
    for chunk in _chunks(identity):
        # a starter between them keeps hi before lo; a non-starter joins their run, which NFD sorts (lo first)
        chars = [chr(c) for c in chunk.tolist()]
        for ch, got in zip(chars, _normalize_each(norm, ["a" + hi + ch + lo for ch in chars])):
            if got != "a" + hi + ch + lo:
                nonstarters.append(ord(ch))
    # order them pairwise: x sorts after y when "a" x y comes out as "a" y x
    greater: dict[int, set[int]] = {x: set() for x in nonstarters}
    probes = [(x, y) for x in nonstarters for y in nonstarters if x != y]
    outs = _normalize_each(norm, ["a" + chr(x) + chr(y) for x, y in probes])
    for (x, y), out in zip(probes, outs):
        if out == "a" + chr(y) + chr(x):
            greater[x].add(y)
        elif out != "a" + chr(x) + chr(y):
            raise RuntimeError(f"U+{x:04X} U+{y:04X} normalize to neither order")
    levels = sorted({len(v) for v in greater.values()})
    if len(levels) > 255:
        raise RuntimeError("more combining classes than the rank table holds")
    for x, below in greater.items():
        rank[x] = 1 + levels.index(len(below))
    # code points that vanish: a starter among them (a nonspacing mark of class 0) stops reordering
    vanish = cps[mapping[cps] == -1]
    for chunk in _chunks(vanish):
        clist = chunk.tolist()
        outs = _normalize_each(norm, ["a" + hi + chr(c) + lo for c in clist])
        for c, out in zip(clist, outs):
            if out == "a" + hi + lo:
                flags[c] |= FLAG_BLOCK
            elif out != "a" + lo + hi:
                raise RuntimeError(f"U+{c:04X} between two non-starters normalizes unexpectedly")


def tables_for(flags: NormalizerFlags) -> Tables:
    """The tables for a normalizer's flags: from memory, else ``dll/build/wordpiece_tables``, else built (seconds).

    One process on a host builds a missing file while the others wait for it and read it (a lock file beside
    it): a fresh GPU host's worker pool (20 processes) otherwise built the same tables 20 times at once on its
    first batches, which held every core for the job's first seconds (NOTES 4l)."""
    import tokenizers

    version = tokenizers.__version__
    key = (flags, version)
    if key in _memo:
        return _memo[key]
    path = CACHE_DIR / f"norm-v{FORMAT}-{version}-{flags.key()}.npz"
    tables = _load(path)
    if tables is None:
        with _build_lock(path.with_suffix(".lock")):
            tables = _load(path)  # built by another process while this one waited
            if tables is None:
                logger.info("building WordPiece tables for %s from tokenizers %s", flags.key(), version)
                tables = _build(flags, version)
                t = tables
                _save(
                    path,
                    lambda f: np.savez_compressed(
                        f,
                        map=t.map,
                        pool=t.pool,
                        flags=t.flags,
                        rank=t.rank,
                        reorders=t.reorders,
                        max_tokens_per_byte=t.max_tokens_per_byte,
                    ),
                )
    _memo[key] = tables
    return tables


def _load(path: Path) -> Tables | None:
    try:
        with np.load(path) as z:
            return Tables(
                z["map"], z["pool"], z["flags"], z["rank"], bool(z["reorders"]), float(z["max_tokens_per_byte"])
            )
    except (OSError, ValueError, KeyError):
        return None


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (``flock``) while a table is built; none where the cache cannot be written
    (each process then builds its own, as before)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
