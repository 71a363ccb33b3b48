"""Chunking: long texts cut into token windows that each fit the model, with spans back into the text.

    spec = ChunkSpec.parse("tokens:200:32")       # or "sentences:240", "tokens" (windows of max_seq_len - 2)
    chunker = Chunker(tokenizer, spec)            # tokenizer: core.tokenize.Tokenizer
    spans = chunker.split(texts, titles)          # Spans: doc, chunk, token span, character span per chunk

A text's word pieces (no [CLS]/[SEP]) are numbered 0..n-1; a chunk is the pieces ``[tok_start, tok_end)`` and
the characters ``[char_start, char_end)`` of the original text that hold them (from the tokenizer's offsets),
so ``text[char_start:char_end]`` is what is embedded (after ``title + " "`` when a title column is used).
One exception: a word of more pieces than the window is cut between its pieces, and a span that starts or
ends inside it holds the characters of those pieces, which tokenize again to other pieces ("##believ" alone
is "bel ##iev"): what is embedded is then that substring, close to but not exactly the pieces counted.

Rules (pure functions of the text, the title and the spec, so every run cuts the same chunks):

* ``tokens:N[:OVERLAP]``: at most N pieces a chunk (``N <= max_seq_len - 2``, less the title's pieces when
  there is a title; a title that would leave less than N/2 is cut to its first words that leave N/2), cut at
  the last word start within the window (never inside a word, unless one word is longer than the window);
  the next chunk starts at the first word start at or after ``end - OVERLAP``.
* ``sentences:N[:OVERLAP]``: the same windows, cut at the last sentence start within the window when there is
  one (after ``. ! ?`` or ``…`` followed by whitespace, after ``。！？；``, or a line break), else at a word
  start as above; the overlap starts at a sentence start when one falls within it (before the cut), else at
  the first word start at or after ``end - OVERLAP``.
* ``auto``: ``AUTO``, the setting that scored best on BEIR SciFact (``BENCHMARKS.md``).

Consecutive chunks cover every piece (overlapping by at most OVERLAP pieces), so no token of a text is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError

__all__ = ["ChunkSpec", "Chunker", "Spans", "MODES", "SENTENCE_ENDS", "AUTO"]

MODES = ("tokens", "sentences")
# ``--chunk auto``: the setting that scored best on BEIR SciFact with all-MiniLM-L6-v2 (BENCHMARKS.md):
# windows of 128 tokens, 32 of them shared with the next window
AUTO = "tokens:128:32"
SENTENCE_ENDS = frozenset(".!?。！？；…")
_CJK_ENDS = frozenset("。！？；")  # full-width marks: the next sentence follows with no space
_CLOSERS = frozenset("\"')]}”’」』）")  # a closing quote or bracket right after a sentence end belongs to it


@dataclass(frozen=True)
class ChunkSpec:
    """A parsed ``--chunk`` value: mode, window (pieces; 0 = max_seq_len - 2) and overlap (pieces)."""

    mode: str
    size: int = 0
    overlap: int = 0

    @classmethod
    def parse(cls, spec: str | None) -> ChunkSpec | None:
        """``tokens[:N[:OVERLAP]]``, ``sentences[:N[:OVERLAP]]`` or ``auto`` (``AUTO``); empty or ``none``: no
        chunking (None)."""
        if spec is None or not spec.strip() or spec.strip().lower() in ("none", "off"):
            return None
        if spec.strip().lower() == "auto":
            spec = AUTO
        parts = spec.strip().split(":")
        mode = parts[0].lower()
        fix = f"write --chunk tokens:N[:OVERLAP] or sentences:N[:OVERLAP], e.g. tokens:200:32, or auto ({AUTO})"
        if mode not in MODES or len(parts) > 3:
            raise ConfigError(f"--chunk {spec!r}: unknown form; {fix}")
        try:
            size = int(parts[1]) if len(parts) > 1 and parts[1] else 0
            overlap = int(parts[2]) if len(parts) > 2 and parts[2] else 0
        except ValueError:
            raise ConfigError(f"--chunk {spec!r}: N and OVERLAP must be whole numbers of tokens; {fix}") from None
        if len(parts) > 1 and parts[1] and size < 1:
            raise ConfigError(f"--chunk {spec!r}: a window of {size} tokens holds nothing; give N >= 1 ({fix})")
        if overlap < 0:
            raise ConfigError(f"--chunk {spec!r}: overlap {overlap} < 0; give 0 <= OVERLAP < N")
        if size and overlap >= size:
            raise ConfigError(
                f"--chunk {spec!r}: overlap {overlap} >= window {size} would never move forward; give OVERLAP < N "
                f"(e.g. {mode}:{size}:{size // 4})"
            )
        return cls(mode, size, overlap)

    def window(self, max_seq_len: int) -> int:
        """Pieces a chunk may hold with this model (refuses a window the model cannot take whole)."""
        room = max_seq_len - 2
        if self.size > room:
            raise ConfigError(
                f"--chunk {self.label()}: a window of {self.size} tokens does not fit the model, which takes "
                f"{max_seq_len} tokens with [CLS] and [SEP]: give N <= {room}"
            )
        if self.overlap >= (self.size or room):
            raise ConfigError(f"--chunk {self.label()}: overlap {self.overlap} >= window {room}; give OVERLAP < N")
        return self.size or room

    def label(self) -> str:
        """The canonical spelling (part of the job id and the manifest)."""
        return f"{self.mode}:{self.size}:{self.overlap}" if self.size else f"{self.mode}::{self.overlap}"


@dataclass
class Spans:
    """Chunks of a list of texts, in text order then chunk order (arrays of length C)."""

    doc: np.ndarray  # int64: position of the chunk's text in the list
    chunk: np.ndarray  # int32: chunk index within its text (0, 1, ...)
    tok_start: np.ndarray  # int32: first word piece (0 = the text's first, specials not counted)
    tok_end: np.ndarray  # int32: one past the last
    char_start: np.ndarray  # int64: first character (Python str index into the original text)
    char_end: np.ndarray  # int64: one past the last
    title_tokens: np.ndarray  # int32 [len(texts)]: word pieces of each text's title as embedded (0 without one)
    title_chars: np.ndarray  # int64 [len(texts)]: characters of the title embedded (-1: all; a title of more
    # than max_seq_len - 2 - N/2 pieces is cut at a word start so that chunks keep at least half the window)


class Chunker:
    """Cuts texts into chunks by a ``ChunkSpec`` with a model's tokenizer (see the module docstring)."""

    def __init__(self, tokenizer, spec: ChunkSpec) -> None:  # core.tokenize.Tokenizer (HF: it has the offsets)
        self.tokenizer, self.spec = tokenizer, spec
        self.max_seq_len = int(tokenizer.max_seq_len)
        self.size = spec.window(self.max_seq_len)

    def split(self, texts: list[str], titles: list[str | None] | None = None) -> Spans:
        """Every text's chunks (a text with no word pieces gets none); ``titles``: each text's title or None."""
        encs = self.tokenizer.pieces(texts)
        title_tokens = np.zeros(len(texts), dtype=np.int32)
        if titles is not None:
            have = [i for i, t in enumerate(titles) if t and t.strip()]
            if have:
                _, full = self.tokenizer.lengths([titles[i] for i in have])
                title_tokens[have] = full - 2
        title_chars = np.full(len(texts), -1, dtype=np.int64)
        most = self.max_seq_len - 2 - max(1, self.size // 2)  # a title leaves at least half the window to the text
        long = np.flatnonzero(title_tokens > most).tolist()
        if long and titles is not None:  # cut at the last word start that fits (retokenizes to the same pieces)
            for i, enc in zip(long, self.tokenizer.pieces([titles[i] for i in long])):
                cut = _last_in(_word_starts(enc.word_ids, len(enc.offsets)), 0, most) or 0
                title_tokens[i], title_chars[i] = cut, enc.offsets[cut - 1][1] if cut else 0
        cols: list[list[int]] = [[], [], [], [], [], []]
        for d, (text, enc) in enumerate(zip(texts, encs)):
            offsets = enc.offsets
            n = len(offsets)
            if not n:
                continue
            window = max(1, min(self.size, self.max_seq_len - 2 - int(title_tokens[d])))
            overlap = min(self.spec.overlap, window - 1)
            words = _word_starts(enc.word_ids, n)
            sentences = _sentence_starts(text, offsets, words) if self.spec.mode == "sentences" else None
            for k, (s, e) in enumerate(_cuts(n, window, overlap, words, sentences)):
                cols[0].append(d)
                cols[1].append(k)
                cols[2].append(s)
                cols[3].append(e)
                cols[4].append(offsets[s][0])
                cols[5].append(offsets[e - 1][1])
        i32, i64 = np.int32, np.int64
        return Spans(
            np.asarray(cols[0], i64),
            np.asarray(cols[1], i32),
            np.asarray(cols[2], i32),
            np.asarray(cols[3], i32),
            np.asarray(cols[4], i64),
            np.asarray(cols[5], i64),
            title_tokens,
            title_chars,
        )


def _word_starts(word_ids: list, n: int) -> np.ndarray:
    """Sorted piece positions that begin a word (a piece whose word differs from the previous piece's)."""
    w = np.asarray([-1 if x is None else x for x in word_ids], dtype=np.int64)
    starts = np.ones(n, dtype=bool)
    starts[1:] = w[1:] != w[:-1]
    return np.flatnonzero(starts)


def _sentence_starts(text: str, offsets: list, words: np.ndarray) -> np.ndarray:
    """Sorted word starts that begin a sentence: after a sentence-ending mark (and any closing quotes or
    brackets) followed by whitespace (a CJK mark needs none: "0.42", "example.com" and "e.g.," are not cut), or
    after a line break."""
    out = []
    for j in words.tolist():
        if j == 0:
            continue
        prev_end, start = offsets[j - 1][1], offsets[j][0]
        ch = text[offsets[j - 1][0] : prev_end]
        gap = text[prev_end:start]
        if "\n" in gap:
            out.append(j)
            continue
        mark = ch[-1:] if ch[-1:] in SENTENCE_ENDS else ""
        if not mark and ch[-1:] in _CLOSERS and j >= 2:
            mark = text[offsets[j - 2][1] - 1 : offsets[j - 2][1]]
            mark = mark if mark in SENTENCE_ENDS else ""
        spaced = gap[:1].isspace() or mark in _CJK_ENDS
        if mark and spaced and text[start : start + 1] not in SENTENCE_ENDS | _CLOSERS:
            out.append(j)
    return np.asarray(out, dtype=np.int64)


def _last_in(starts: np.ndarray | None, lo: int, hi: int) -> int | None:
    """The largest of ``starts`` in ``(lo, hi]``, or None."""
    if starts is None or not len(starts):
        return None
    i = int(np.searchsorted(starts, hi, side="right")) - 1
    return int(starts[i]) if i >= 0 and starts[i] > lo else None


def _first_in(starts: np.ndarray | None, lo: int, hi: int) -> int | None:
    """The smallest of ``starts`` in ``[lo, hi]``, or None."""
    if starts is None or not len(starts):
        return None
    i = int(np.searchsorted(starts, lo, side="left"))
    return int(starts[i]) if i < len(starts) and starts[i] <= hi else None


def _cuts(n: int, window: int, overlap: int, words: np.ndarray, sentences: np.ndarray | None) -> list[tuple[int, int]]:
    """``[(start, end)]`` piece spans covering ``0..n``: each at most ``window`` long, consecutive ones overlapping
    by at most ``overlap``; every start > the previous one."""
    cuts, s, e = [], 0, 0
    while True:
        if s + window >= n:
            cuts.append((s, n))
            return cuts
        limit, after = s + window, max(s, e)  # a cut past the previous one (an overlap must not cut there again)
        e = _last_in(sentences, after, limit) or _last_in(words, after, limit) or limit
        cuts.append((s, e))
        nxt = e
        if overlap:  # the next chunk starts at a sentence start inside the overlap, else at a word start
            lo = max(s + 1, e - overlap)
            nxt = _first_in(sentences, lo, e - 1) or _first_in(words, lo, e) or e
        s = nxt
