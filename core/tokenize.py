"""Tokenization with Hugging Face ``tokenizers`` (Rust), from the model's own files.

``Tokenizer.encode(texts)`` returns the engine contract directly: packed token ids, one
length per text, and the truncation facts (``n_tokens``, ``truncated``) that the output
records. Lower-casing, accent stripping and Chinese character splitting follow the model's
config, so Chinese text tokenizes exactly as Google's BERT ``BasicTokenizer`` does.

``dll.wordpiece.make_tokenizer`` returns a C tokenizer with this class's interface and exactly its ids
where the ``tokenizer.json`` is a plain BERT one; this class stays the reference it is tested against
and the fallback for everything else.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer", "Encoded", "build_tokenizer_json"]


@dataclass
class Encoded:
    """Texts as the engine takes them (packed tokens, no padding) plus what truncation did."""

    token_ids: np.ndarray  # int32 [T], every text's ids back to back, [CLS] ... [SEP]
    lengths: np.ndarray  # int32 [B], tokens per text after truncation
    truncated: np.ndarray  # bool  [B], True where the text had more than max_seq_len tokens
    n_tokens_full: np.ndarray  # int32 [B], tokens the text would have had without truncation

    def __len__(self) -> int:
        return len(self.lengths)


def build_tokenizer_json(
    vocab_file: str, lowercase: bool, strip_accents: bool | None, tokenize_chinese_chars: bool = True
) -> str:
    """A ``tokenizer.json`` for a plain BERT WordPiece vocab, as Google's BERT tokenizes."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    vocab: dict[str, int] = {}
    with open(vocab_file, encoding="utf-8") as f:
        for i, line in enumerate(f):
            word = line.rstrip("\n")
            if word:
                vocab.setdefault(word, i)
    for special in ("[UNK]", "[CLS]", "[SEP]"):
        if special not in vocab:
            raise CheckpointError(f"{vocab_file} lacks {special}: not a BERT vocabulary")
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=tokenize_chinese_chars, strip_accents=strip_accents, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok.to_str()


class Tokenizer:
    """BERT tokenizer from a ``tokenizer.json`` string; truncates to ``max_seq_len`` tokens."""

    def __init__(self, tokenizer_json: str, max_seq_len: int) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.max_seq_len = max_seq_len
        self._tok = HFTokenizer.from_str(tokenizer_json)
        self._tok.no_padding()
        self._tok.no_truncation()
        self._batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self.cls_id = self._tok.token_to_id("[CLS]")
        self.sep_id = self._tok.token_to_id("[SEP]")

    @classmethod
    def from_file(cls, path: str | Path, max_seq_len: int) -> Tokenizer:
        return cls(Path(path).read_text(encoding="utf-8"), max_seq_len)

    def _encode_batch(self, texts: list[str]) -> list:
        """HF encodings (ids, no character offsets: ``encode_batch_fast`` where this tokenizers has it)."""
        return self._batch(texts, add_special_tokens=True)

    def lengths(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(int32 tokens per text after truncation, int32 tokens without it): the scan's question,
        answered without copying any token ids into Python."""
        return self._lengths_of(self._encode_batch(texts))

    def _lengths_of(self, encs: list) -> tuple[np.ndarray, np.ndarray]:
        full = np.fromiter((len(e) for e in encs), dtype=np.int32, count=len(encs))
        return np.minimum(full, self.max_seq_len).astype(np.int32), full

    def encode(self, texts: list[str]) -> Encoded:
        """Tokenize a batch. Texts must be non-empty strings (the producer quarantines others)."""
        encs = self._encode_batch(texts)
        lengths, full = self._lengths_of(encs)
        sep = [self.sep_id]
        # a truncated text keeps [CLS] + its first n-2 word pieces + [SEP], as BERT truncation does
        seqs = (e.ids if n == f else e.ids[: n - 1] + sep for e, n, f in zip(encs, lengths.tolist(), full.tolist()))
        ids = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum()))
        return Encoded(ids, lengths, full > lengths, full)

    def pieces(self, texts: list[str]) -> list:
        """HF encodings of ``texts`` without [CLS]/[SEP], with character ``offsets`` into each original text and
        ``word_ids`` (what chunking cuts by; slower than ``lengths``, which skips the offsets)."""
        return self._tok.encode_batch(texts, add_special_tokens=False)

    def tokens(self, text: str) -> list[str]:
        """Word pieces of one text, without specials (for debugging and tests)."""
        return self._tok.encode(text, add_special_tokens=False).tokens


def tokenizer_json_for(spec) -> str:  # spec: engine.checkpoint.TokenizerSpec
    """The tokenizer.json text for a checkpoint's tokenizer spec (generated from vocab.txt when needed)."""
    if spec.tokenizer_json:
        text = Path(spec.tokenizer_json).read_text(encoding="utf-8")
        json.loads(text)  # fail early on a damaged file
        return text
    if not spec.vocab_file:
        raise CheckpointError("the checkpoint has no tokenizer.json and no vocab.txt")
    return build_tokenizer_json(spec.vocab_file, spec.lowercase, spec.strip_accents, spec.tokenize_chinese_chars)
