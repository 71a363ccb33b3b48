"""The batch task's own logic (workers/task.py run_batch), with the real tokenizer and a fake engine."""

from __future__ import annotations

import numpy as np

from workers.task import BatchMessage, run_batch


class _Engine:
    """Embeds each document as a one-hot of its first word piece; rejects documents whose text holds 'REJECT'."""

    def __init__(self, dim: int, reject_id: int) -> None:
        self.dim, self.reject_id, self.calls = dim, reject_id, []

    def embed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        from workers.triton_client import BadRowsError

        self.calls.append(lengths.copy())
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        bad = [r for r in range(len(lengths)) if self.reject_id in ids[offsets[r] : offsets[r + 1]]]
        if bad:
            raise BadRowsError(f"[fbas:bad_rows] rows {bad}", bad)
        out = np.zeros((len(lengths), self.dim), np.float32)
        out[np.arange(len(lengths)), ids[offsets[:-1] + 1] % self.dim] = 1.0
        return out


def test_rows_without_tokens_and_rejected_rows_are_quarantined_and_the_rest_line_up(minilm_tokenizer):
    """With estimated lengths a text of control characters reaches a worker: it is quarantined as no_tokens and
    never sent; a row the server rejects is quarantined with its reason; every other row keeps its own vector."""
    tok = minilm_tokenizer
    texts = ["alpha words", "\x01\x02", "beta REJECT", "gamma", "\x03", "delta epsilon"]
    reject = tok.encode(["REJECT"]).token_ids[1]
    m = BatchMessage(
        "job", 3, "/out", "fp", "int64", 16, np.arange(100, 106), [f"d{i}" for i in range(6)], texts, np.zeros(6, bool)
    )
    engine = _Engine(16, int(reject))
    out = run_batch(m, engine, tok, 16)
    assert out.q_row_ids.tolist() == [101, 102, 104]
    assert out.q_reasons[0] == out.q_reasons[2] == "no_tokens"
    assert out.q_reasons[1].startswith("rejected by the model server")
    assert out.row_ids.tolist() == [100, 103, 105] and out.ids == ["d0", "d3", "d5"]
    enc = tok.encode([texts[i] for i in (0, 3, 5)])
    offsets = np.concatenate([[0], np.cumsum(enc.lengths)])
    want = np.zeros((3, 16), np.float32)
    want[np.arange(3), enc.token_ids[offsets[:-1] + 1] % 16] = 1.0
    assert np.array_equal(out.vectors, want), "each kept row has its own vector"
    assert out.n_tokens.tolist() == enc.lengths.tolist()
    assert all(2 not in c.tolist() for c in engine.calls), "no [CLS] [SEP]-only document was sent"


def _message(v: int, **extra) -> dict:
    return {
        "v": v,
        "job": "j",
        "batch": 4,
        "out": "/out",
        "model": "m",
        "id_type": "string",
        "dim": 8,
        "row_ids": [10, 11],
        "ids": ["a", "a"],
        "texts": ["first chunk", "second chunk"],
        "repaired": [1],
        **extra,
    }


def test_a_chunked_message_parses_with_its_chunk_columns():
    """A version 3 message (CHUNKED_VERSION) carries each row's doc_row, chunk and spans; a length mismatch is
    refused, and a plain message has none."""
    import pytest

    from core.errors import InputError
    from core.formats import CHUNK_FIELDS
    from workers.signing import CHUNKED_VERSION, MESSAGE_VERSION

    assert CHUNKED_VERSION == 3
    cols = {"doc_row": [5, 5], "chunk": [0, 1], "tok_start": [0, 3], "tok_end": [4, 6]}
    cols |= {"char_start": [0, 9], "char_end": [12, 20]}
    m = BatchMessage.parse(_message(CHUNKED_VERSION, chunks=cols))
    assert m.chunks is not None and {f: getattr(m.chunks, f).tolist() for f in CHUNK_FIELDS} == cols
    assert m.repaired.tolist() == [False, True] and m.row_ids.tolist() == [10, 11]
    assert BatchMessage.parse(_message(MESSAGE_VERSION)).chunks is None
    with pytest.raises(InputError, match="chunk columns"):
        BatchMessage.parse(_message(CHUNKED_VERSION, chunks={**cols, "chunk": [0]}))
