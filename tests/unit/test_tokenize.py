"""Tokenization: exactly Google BERT's (transformers' slow BertTokenizer), Chinese included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.tokenize import Tokenizer, build_tokenizer_json, tokenizer_json_for
from tests.wordpiece_corpus import chinese_sentences

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _slow(vocab: str, lowercase: bool = True):
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) is the tokenizer oracle")
    return transformers.BertTokenizer(vocab, do_lower_case=lowercase, tokenize_chinese_chars=True)


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_chinese_matches_google_bert(default_checkpoint, shared_data, source):
    spec = default_checkpoint.tokenizer
    if source == "tokenizer.json":
        tok_json = tokenizer_json_for(spec)
    else:  # what a Google TF folder (vocab.txt only) gets
        tok_json = build_tokenizer_json(spec.vocab_file, lowercase=True, strip_accents=None)
    ours = Tokenizer(tok_json, max_seq_len=10_000)
    slow = _slow(spec.vocab_file)
    texts = chinese_sentences(shared_data)
    assert len(texts) > 10_000
    enc = ours.encode(texts)
    ids = np.split(enc.token_ids, np.cumsum(enc.lengths)[:-1])
    mismatches = [t for t, got in zip(texts, ids) if got.tolist() != slow.encode(t)]
    assert not mismatches, f"{len(mismatches)} texts tokenize differently, e.g. {mismatches[:3]}"


def test_tf_fixture_vocab_matches_google_bert():
    vocab = str(FIXTURES / "tf_bert_tiny" / "vocab.txt")
    ours = Tokenizer(build_tokenizer_json(vocab, True, None), 64)
    slow = _slow(vocab)
    for text in ["我是中国人", "他不在上海。", "Hello, 世界! 2026年", "ÉCOLE naïve", "a\u200bb\x00c"]:
        enc = ours.encode([text])
        assert enc.token_ids.tolist() == slow.encode(text), text


def test_truncation_is_recorded(default_checkpoint):
    tok = Tokenizer(tokenizer_json_for(default_checkpoint.tokenizer), max_seq_len=16)
    enc = tok.encode(["short text", "word " * 100])
    assert enc.lengths.tolist() == [4, 16]
    assert enc.truncated.tolist() == [False, True]
    assert enc.n_tokens_full[1] == 102
    last = enc.token_ids[enc.lengths[0] :]
    assert last[0] == tok.cls_id and last[-1] == tok.sep_id


def test_lengths_and_packed_ids_match_one_text_at_a_time(default_checkpoint):
    """The batch path (lengths only, and ids packed by one copy) equals encoding each text alone,
    truncated texts included (first n-1 ids, then [SEP])."""
    tok = Tokenizer(tokenizer_json_for(default_checkpoint.tokenizer), max_seq_len=12)
    texts = ["A man is playing a guitar.", "word " * 30, "一个男人在弹吉他。", "x", "Über café naïve " * 5]
    enc = tok.encode(texts)
    lengths, full = tok.lengths(texts)
    assert lengths.tolist() == enc.lengths.tolist() and full.tolist() == enc.n_tokens_full.tolist()
    assert enc.truncated.tolist() == [False, True, False, False, True]
    pos = 0
    for text, n in zip(texts, enc.lengths):
        alone = tok._tok.encode(text).ids
        expect = alone if len(alone) <= 12 else alone[:11] + [tok.sep_id]
        assert enc.token_ids[pos : pos + n].tolist() == expect
        pos += n
    assert pos == len(enc.token_ids)


def test_lowercase_and_accents_follow_the_config(default_checkpoint):
    tok = Tokenizer(tokenizer_json_for(default_checkpoint.tokenizer), 32)
    assert tok.tokens("HÉLLO") == tok.tokens("hello")
