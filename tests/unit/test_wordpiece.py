"""The C WordPiece tokenizer (``dll.wordpiece``) gives HF ``tokenizers``' ids (``core.tokenize.Tokenizer``),
lengths and truncation facts exactly, for uncased, cased, accent-stripping, raw and Chinese configurations."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from core.tokenize import Encoded, Tokenizer, build_tokenizer_json
from dll import wordpiece
from dll.wordpiece import FastTokenizer, make_tokenizer
from tests.wordpiece_corpus import random_bytes, random_unicode_texts, with_normalizer, write_chinese_vocab

ADVERSARIAL = [
    # accents and combining marks, precomposed and decomposed, in several orders
    "Café naïve résumé ÉCOLE Ångström",
    "e\u0301 E\u0301\u0327 e\u0327\u0301 a\u0308\u0323 a\u0323\u0308 o\u0302\u0323\u0301",
    "a\U0001d165\u1b44 a\u1b44\U0001d165 a\U0001d165\u0301\u1b44 a\U0001d165\u0941\u1b44 \U0001d15e\u1b44",
    "x\u0f71\u0f72\u0f74 \u0f73\u0f75 \u0941\u0301 \u0345\u0301 \u0344 \u08d4\u0301 \U0001e000\u0300",
    "\u0301\u0301 leading marks, \u302e\u302f, \U00016ff0\u1b44",
    # controls, NUL, U+FFFD, zero-width characters
    "a\x00b a\x01b\x7fc \x1f\x85",
    "a\ufffdb \ufffd \u200bword\u200b a\u200db \ufeffbom \xadsoft",
    # emoji, astral-plane CJK (ext B, G), compatibility ideographs, fullwidth and CJK punctuation
    "I \u2764\ufe0f \U0001f355 \U0001f469\u200d\U0001f469\u200d\U0001f467 \U0001f1fa\U0001f1f8",
    "\U00020000\U00020001 \U0002a700 \U00030000x \uf900\u4e00",
    "ＡＢＣ！？ ｶﾀｶﾅ 你好，世界。「引号」——《书名》",
    # long words around max_input_chars_per_word (100), before and after normalization
    "a" * 100,
    "a" * 101,
    "é" * 100,
    "e\u0301" * 60,
    "x" * 99 + "\u0301" * 5 + " tail",
    "supercalifragilisticexpialidocious" * 3,
    # whitespace of every kind
    "a\u00a0b\u2003c\u3000d\te\nf\r\ng\u1680h\u2028i\u2029j\x0bk\x0cl",
    # mixed scripts and case mappings
    "Москва Αθήνα القاهرة 東京 서울 Hà Nội ОДИН",
    "İstanbul ΣΊΣΥΦΟΣ straße ẞ ﬁne Å K ǅ",
    # nothing left after normalization
    "",
    " ",
    "\x00\x01\x02",
    "\ufffd\u200b",
    "\u0301\u0301",
    # special-token strings inside text
    "[MASK] hello [CLS]x[SEP] [mask] [MASK [UNK]",
    "don't stop ... e-mail@x.com $100 3.14 ##ing # ##",
    "A man is playing a guitar.",
]


@pytest.fixture(scope="module")
def configs(minilm_tokenizer_json, default_checkpoint, shared_data, tmp_path_factory) -> dict[str, str]:
    """tokenizer.json texts: MiniLM as shipped (uncased), cased, accent-stripping cased, raw (no text cleaning,
    no CJK splitting) and a Chinese vocab built from the Chinese data."""
    vocab = default_checkpoint.tokenizer.vocab_file
    zh_vocab = write_chinese_vocab(shared_data, tmp_path_factory.mktemp("zh") / "vocab.txt")
    return {
        "uncased": minilm_tokenizer_json,
        "cased": build_tokenizer_json(vocab, lowercase=False, strip_accents=None),
        "cased-strip": build_tokenizer_json(vocab, lowercase=False, strip_accents=True),
        "raw": with_normalizer(minilm_tokenizer_json, clean_text=False, handle_chinese_chars=False),
        "chinese": build_tokenizer_json(str(zh_vocab), lowercase=True, strip_accents=None),
    }


def _same(got: Encoded, want: Encoded, texts: list[str]) -> None:
    assert got.lengths.tolist() == want.lengths.tolist()
    assert got.n_tokens_full.tolist() == want.n_tokens_full.tolist()
    assert got.truncated.tolist() == want.truncated.tolist()
    if not np.array_equal(got.token_ids, want.token_ids):
        cut = np.cumsum(want.lengths)[:-1]
        pairs = zip(texts, np.split(got.token_ids, cut), np.split(want.token_ids, cut))
        bad = [(t, g.tolist(), w.tolist()) for t, g, w in pairs if g.tolist() != w.tolist()]
        pytest.fail(f"{len(bad)} texts differ from HF, e.g. {bad[:3]}")


@pytest.mark.parametrize("name", ["uncased", "cased", "cased-strip", "raw", "chinese"])
@pytest.mark.parametrize("max_seq_len", [512, 8])
def test_adversarial_texts_match_hf(wordpiece_lib, configs, name, max_seq_len):
    ours, hf = FastTokenizer(configs[name], max_seq_len), Tokenizer(configs[name], max_seq_len)
    _same(ours.encode(ADVERSARIAL), hf.encode(ADVERSARIAL), ADVERSARIAL)
    for got, want in zip(ours.lengths(ADVERSARIAL), hf.lengths(ADVERSARIAL)):
        assert got.tolist() == want.tolist()
    assert (ours.cls_id, ours.sep_id) == (hf.cls_id, hf.sep_id)


@pytest.mark.parametrize("name", ["uncased", "cased-strip", "raw", "chinese"])
def test_random_unicode_matches_hf(wordpiece_lib, configs, name):
    texts = random_unicode_texts(seed=7, n=3000)
    _same(FastTokenizer(configs[name], 64).encode(texts), Tokenizer(configs[name], 64).encode(texts), texts)


@pytest.mark.parametrize("max_seq_len", [1, 2, 3, 5, 16])
def test_truncation_keeps_cls_first_pieces_sep(wordpiece_lib, minilm_tokenizer_json, max_seq_len):
    texts = ["word " * 30, "x", "", "Über café naïve " * 5, "一个男人在弹吉他。" * 3]
    got = FastTokenizer(minilm_tokenizer_json, max_seq_len).encode(texts)
    _same(got, Tokenizer(minilm_tokenizer_json, max_seq_len).encode(texts), texts)
    assert got.truncated.any() and (got.lengths <= max_seq_len).all()


def test_combining_marks_reorder_as_hf_nfd(wordpiece_lib, tmp_path):
    """Accent stripping decomposes (NFD), which sorts surviving non-starters by combining class: "a" U+1D165
    (class 216) U+1B44 (class 9) becomes the vocab word "a" U+1B44 U+1D165, unless a class-0 mark that
    stripping drops (U+0941) stands between them."""
    word = "a\u1b44\U0001d165"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", word]) + "\n", encoding="utf-8")
    tok_json = build_tokenizer_json(str(vocab), lowercase=True, strip_accents=None)
    texts = ["a\U0001d165\u1b44", "a\u1b44\U0001d165", "a\U0001d165\u0301\u1b44", "a\U0001d165\u0941\u1b44"]
    ours, hf = FastTokenizer(tok_json, 16).encode(texts), Tokenizer(tok_json, 16).encode(texts)
    _same(ours, hf, texts)
    pieces = np.split(ours.token_ids, np.cumsum(ours.lengths)[:-1])
    assert [p[1:-1].tolist() for p in pieces] == [[5], [5], [5], [1]]  # 5: the word, 1: [UNK]


def test_utf8_buffer_from_arrow_matches_list_path(wordpiece_lib, minilm_tokenizer_json):
    pa = pytest.importorskip("pyarrow")
    texts = ADVERSARIAL * 3
    arr = pa.array(texts, type=pa.large_string()).slice(2)  # a sliced array: offsets do not start at 0
    _, offsets, data = arr.buffers()
    offs = np.frombuffer(offsets, np.int64)[arr.offset : arr.offset + len(arr) + 1]
    tok = FastTokenizer(minilm_tokenizer_json, 32)
    _same(tok.encode_utf8(data, offs), tok.encode(texts[2:]), texts[2:])
    lengths, full = tok.lengths_utf8(data, offs)
    assert lengths.tolist() == tok.encode(texts[2:]).lengths.tolist()
    assert full.tolist() == Tokenizer(minilm_tokenizer_json, 32).lengths(texts[2:])[1].tolist()


def test_invalid_utf8_is_replaced_not_fatal(wordpiece_lib, minilm_tokenizer_json):
    """Invalid bytes decode to U+FFFD, which text cleaning drops, as HF does with Python's replacement."""
    blobs = random_bytes(seed=3, n=2000)
    offs = np.zeros(len(blobs) + 1, np.int64)
    np.cumsum([len(b) for b in blobs], out=offs[1:])
    texts = [b.decode("utf-8", "replace") for b in blobs]
    got = FastTokenizer(minilm_tokenizer_json, 64).encode_utf8(b"".join(blobs), offs)
    _same(got, Tokenizer(minilm_tokenizer_json, 64).encode(texts), texts)


@pytest.mark.parametrize("offsets", [[0, 5, 3], [0, 4, 99], [-1, 2]])
def test_bad_offsets_are_refused(wordpiece_lib, minilm_tokenizer_json, offsets):
    tok = FastTokenizer(minilm_tokenizer_json, 32)
    with pytest.raises(RuntimeError, match="bad arguments"):
        tok.encode_utf8(b"hello world", np.array(offsets, np.int64))


def test_threads_give_the_same_ids(wordpiece_lib, minilm_tokenizer_json):
    texts = random_unicode_texts(seed=11, n=2000) + ADVERSARIAL
    one = FastTokenizer(minilm_tokenizer_json, 48).encode(texts)
    _same(FastTokenizer(minilm_tokenizer_json, 48, threads=3).encode(texts), one, texts)


def test_make_tokenizer_takes_the_c_one_where_it_applies(wordpiece_lib, minilm_tokenizer_json, monkeypatch):
    fast = make_tokenizer(minilm_tokenizer_json, 128)
    assert isinstance(fast, FastTokenizer) and fast.max_seq_len == 128
    assert fast.tokens("HÉLLO world") == ["hello", "world"]
    monkeypatch.setenv("FBAS_WORDPIECE", "0")
    assert isinstance(make_tokenizer(minilm_tokenizer_json, 128), Tokenizer)


def _edited(tokenizer_json: str, edit) -> str:
    config = json.loads(tokenizer_json)
    edit(config)
    return json.dumps(config)


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.update(normalizer={"type": "Lowercase"}),
        lambda c: c.update(pre_tokenizer={"type": "Whitespace"}),
        lambda c: c["added_tokens"].append(dict(c["added_tokens"][0], id=1, content="hello", normalized=True)),
        lambda c: c["post_processor"].update(single=c["post_processor"]["single"][1:]),
    ],
    ids=["normalizer", "pre-tokenizer", "normalized-added-token", "template"],
)
def test_other_tokenizers_fall_back_to_hf(wordpiece_lib, minilm_tokenizer_json, edit, caplog):
    with caplog.at_level(logging.DEBUG, logger="dll.wordpiece"):
        tok = make_tokenizer(_edited(minilm_tokenizer_json, edit), 64)
    assert isinstance(tok, Tokenizer)
    assert any("using HF tokenizers" in r.getMessage() for r in caplog.records)


def test_missing_library_falls_back_to_hf(minilm_tokenizer_json, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(wordpiece, "LIB_PATH", tmp_path / "absent.so")
    monkeypatch.setattr(wordpiece, "_lib", [])
    with caplog.at_level(logging.INFO, logger="dll.wordpiece"):
        tok = make_tokenizer(minilm_tokenizer_json, 64)
        again = make_tokenizer(minilm_tokenizer_json, 64)
    assert isinstance(tok, Tokenizer) and isinstance(again, Tokenizer)
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1  # one log line, not one per call


def test_worker_uses_make_tokenizer(wordpiece_lib, minilm_tokenizer_json, monkeypatch):
    from workers import task

    class State:
        def tokenizer_json(self) -> str:
            return minilm_tokenizer_json

    monkeypatch.setattr(task, "_TOKENIZERS", {})
    tok = task._tokenizer(State(), "job-1", 256)  # type: ignore[arg-type]
    assert isinstance(tok, FastTokenizer) and task._tokenizer(State(), "job-1", 256) is tok  # type: ignore[arg-type]


_BUILD_ONCE = r"""
import sys, time
from pathlib import Path
import numpy as np
import dll.wordpiece_tables as w
w.CACHE_DIR = Path(sys.argv[1])
def slow_build(flags, version):  # stands in for the seconds-long real build; counts itself
    with open(sys.argv[2], "a") as f:
        f.write("built\n")
    time.sleep(1.0)
    z = np.zeros(4, np.uint8)
    return w.Tables(np.arange(4, dtype=np.int32), np.zeros(1, np.uint32), z, z, False, 1.5)
w._build = slow_build
t = w.tables_for(w.NormalizerFlags(True, True, None, True))
print(t.map.tolist(), t.max_tokens_per_byte)
"""


def test_processes_that_need_the_same_missing_tables_build_them_once(tmp_path):
    """A fresh host's worker processes all ask for the tables at their first batch: one builds the cache file
    while the others wait on its lock and read it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    log = tmp_path / "builds.txt"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD_ONCE, str(tmp_path / "cache"), str(log)],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs == ["[0, 1, 2, 3] 1.5"] * 4, outs
    assert log.read_text().count("built") == 1, "one process built the tables, the others read its file"


def test_a_worker_loads_uncased_berts_tables_before_its_pool_forks(wordpiece_lib):
    """The Celery worker's main process (``worker_init``) holds the default model's tables, so every pool
    process forked from it starts with them rather than loading or building them on its first batch."""
    import tokenizers

    from dll import wordpiece_tables
    from workers.task import _warm_tokenizer_tables

    flags = wordpiece_tables.NormalizerFlags(True, True, None, True)
    wordpiece_tables._memo.pop((flags, tokenizers.__version__), None)
    _warm_tokenizer_tables()
    tables = wordpiece_tables._memo[(flags, tokenizers.__version__)]
    assert tables.map.shape == (wordpiece_tables.NCP,)
