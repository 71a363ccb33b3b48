"""Real English and Chinese texts for the WordPiece parity test and ``benchmarks/bench_tokenize.py``.

``real_sentences(data)`` gives every distinct real sentence in ``tests/data``, English then Chinese, in file
order: STS-B English (``stsb_en`` and ``stsb_multi_mt/stsb-en-*``), SciFact titles, abstracts split into
sentences and queries; Chinese STS-B (``stsb_multi_mt/stsb-zh-*``, ``stsb_zh_cnsd``): 66,577 of them
(56,650 English, 9,927 Chinese). ``parity_corpus(data, n)`` reaches ``n`` texts deterministically: all
real sentences first, then texts derived from them in turn: an English word window (1 to 48 words from the
English stream, from a start that moves by 7 words), a Chinese character window (1 to 64 characters of the
Chinese stream, start moving by 5), an English sentence pair, a Chinese sentence pair and an English +
Chinese pair.

``random_unicode_texts(seed, n)`` gives seeded random strings drawn from every plane, weighted towards what
BERT normalization treats specially (combining marks, the non-starters it reorders, controls, whitespace,
CJK, special-token strings), and ``random_bytes(seed, n)`` random byte strings, mostly invalid UTF-8.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import read_cnsd, read_stsb_multi

__all__ = [
    "real_sentences",
    "parity_corpus",
    "scifact_abstracts",
    "stsb_sentences",
    "random_unicode_texts",
    "random_bytes",
    "SPECIAL_CHARS",
]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def _stsb_en_original(path: Path) -> list[str]:
    """STS-B original distribution: tab separated, sentences in fields 5 and 6."""
    out: list[str] = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 7:
                out += [row[5], row[6]]
    return out


def _scifact(data: Path) -> Iterator[dict]:
    with gzip.open(data / "beir_scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def scifact_abstracts(data: Path) -> list[str]:
    """SciFact documents as the pipeline embeds them: title, a space, abstract (often past 256 tokens)."""
    return [f"{d['title']} {d['text']}".strip() for d in _scifact(data)]


def stsb_sentences(data: Path) -> list[str]:
    """The STS-B English test and dev sentences (stsb_multi_mt), both of each pair, in file order."""
    out: list[str] = []
    for split in ("test", "dev"):
        for a, b, _ in read_stsb_multi(data / "stsb_multi_mt" / f"stsb-en-{split}.csv"):
            out += [a, b]
    return out


def _english(data: Path) -> list[str]:
    texts = _stsb_en_original(data / "stsb_en" / "sts-test.csv") + _stsb_en_original(data / "stsb_en" / "sts-dev.csv")
    texts += stsb_sentences(data)
    for doc in _scifact(data):
        texts.append(doc["title"])
        texts += _SENTENCE_END.split(doc["text"])
    with gzip.open(data / "beir_scifact" / "queries.jsonl.gz", "rt", encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f]
    return texts


def chinese_sentences(data: Path) -> list[str]:
    """Every Chinese STS-B sentence in ``data`` (both copies), in file order, repeats kept."""
    texts: list[str] = []
    for split in ("test", "dev"):
        for a, b, _ in read_stsb_multi(data / "stsb_multi_mt" / f"stsb-zh-{split}.csv"):
            texts += [a, b]
    for name in ("STS-B.test.data", "STS-B.valid.data"):
        for a, b, _ in read_cnsd(data / "stsb_zh_cnsd" / name):
            texts += [a, b]
    return texts


def _distinct(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(t for t in (s.strip() for s in texts) if t))


def real_sentences(data: Path) -> tuple[list[str], list[str]]:
    """(English, Chinese) distinct real sentences, in file order."""
    return _distinct(_english(data)), _distinct(chinese_sentences(data))


def _derived(en: list[str], zh: list[str]) -> Iterator[str]:
    words = " ".join(en).split()
    chars = "".join(zh)
    for k in itertools.count():
        n_words = 1 + k % 48
        start = (7 * k) % max(1, len(words) - n_words)
        yield " ".join(words[start : start + n_words])
        n_chars = 1 + k % 64
        start = (5 * k) % max(1, len(chars) - n_chars)
        yield chars[start : start + n_chars]
        yield f"{en[k % len(en)]} {en[(k + 1) % len(en)]}"
        yield zh[k % len(zh)] + zh[(k + 1) % len(zh)]
        yield f"{en[(3 * k) % len(en)]} {zh[(3 * k) % len(zh)]}"


def parity_corpus(data: Path, n: int) -> tuple[list[str], int, int]:
    """(``n`` texts, how many are real English sentences, how many real Chinese): see the module docstring."""
    en, zh = real_sentences(data)
    texts = (en + zh)[:n]
    texts += itertools.islice(_derived(en, zh), max(0, n - len(texts)))
    return texts, min(len(en), n), max(0, min(len(zh), n - len(en)))


# code points that BERT normalization and pre-tokenization treat specially: combining marks (several classes,
# spacing and nonspacing, class-0 nonspacing ones that block reordering), controls, whitespace, U+FFFD, the
# dotted capital I (lowercases to two code points), a final-sigma candidate, CJK and fullwidth punctuation
SPECIAL_CHARS = [
    0x0301, 0x0308, 0x0327, 0x0323, 0x0345, 0x0344, 0x0F71, 0x0F73, 0x0941, 0x093F, 0x05B0, 0x0E38,
    0x1D165, 0x1D16E, 0x1D15E, 0x1B44, 0xA953, 0x302E, 0x16FF0, 0x08D4, 0x1E000, 0x1DFB,
    0x00, 0x09, 0x0A, 0x0D, 0x1F, 0x7F, 0x85, 0xA0, 0xAD, 0x200B, 0x200D, 0x2028, 0x3000, 0x1680, 0xFEFF, 0xFFFD,
    0x0130, 0x03A3, 0x1E9E, 0xFB01, 0x212B, 0x00C5, 0x1EA0, 0xAC00,
    0x4E00, 0x3400, 0x20000, 0x2A700, 0x30000, 0xF900, 0x3002, 0xFF01, 0xFF0C, 0x300C, 0x2014, 0x00BF,
]  # fmt: skip
_SPECIAL_STRINGS = ["[MASK]", "[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK", "##", "[CLS][SEP]"]


def random_unicode_texts(seed: int, n: int, max_chars: int = 40) -> list[str]:
    """``n`` seeded random strings of 0 to ``max_chars`` code points from all planes (no surrogates)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randrange(max_chars + 1)):
            r = rng.random()
            if r < 0.3:
                c = rng.randrange(0x20, 0x7F)
            elif r < 0.5:
                c = rng.choice(SPECIAL_CHARS)
            elif r < 0.7:
                c = rng.randrange(0x30000)
            else:
                c = rng.randrange(0x110000)
            chars.append(chr(0xFFFD if 0xD800 <= c <= 0xDFFF else c))
        if rng.random() < 0.1:
            chars.insert(rng.randrange(len(chars) + 1), rng.choice(_SPECIAL_STRINGS))
        texts.append("".join(chars))
    return texts


def random_bytes(seed: int, n: int, max_len: int = 64) -> list[bytes]:
    """``n`` seeded random byte strings: bytes drawn uniformly, with cut and valid multi-byte sequences mixed in."""
    rng = random.Random(seed)
    pieces = [b"\xc3", b"\xe4\xb8", b"\xf0\x9f\x98", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"[MASK]"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(max_len)):
            if rng.random() < 0.2:
                parts.append(rng.choice(pieces))
            else:
                parts.append(bytes([rng.randrange(256)]))
        out.append(b"".join(parts))
    return out


def with_normalizer(tokenizer_json: str, **flags: bool | None) -> str:
    """The same ``tokenizer.json`` with some ``BertNormalizer`` flags changed (``clean_text=False``, ...)."""
    config = json.loads(tokenizer_json)
    config["normalizer"].update(flags)
    return json.dumps(config, ensure_ascii=False)


def write_chinese_vocab(data: Path, path: Path) -> Path:
    """A Chinese BERT vocab made from the Chinese STS-B sentences (every character seen, alone and as a
    ``##`` continuation, most frequent first) plus the 3,000 most frequent lower-cased English words of
    STS-B, with the usual special tokens first. Written to ``path``; returns it."""
    from collections import Counter

    en, zh = real_sentences(data)
    chars = Counter(c for t in zh for c in t if not c.isspace())
    words = Counter(w for t in en[:20_000] for w in re.findall(r"[a-z]+", t.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [c for c, _ in chars.most_common()]
    vocab += ["##" + c for c, _ in chars.most_common()]
    vocab += [w for w, _ in words.most_common(3000)]
    vocab += ["##" + w for w, _ in words.most_common(300)]
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return path
