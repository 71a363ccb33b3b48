"""The one small interface every engine implements, and the batching helper they share.

    embed(token_ids, lengths) -> float32 [n_docs, dim]

``token_ids`` holds every document's tokens back to back ([CLS] ... [SEP], int32), and
``lengths`` one count per document: the same unpadded contract as the Triton model's
inputs. Engines that need padding (ONNX, TensorRT) pad internally, length-sorted and cut by
a token budget, so the caller never decides how to pad.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Engine", "length_batches", "split_packed", "check_inputs", "packed_inputs"]


@runtime_checkable
class Engine(Protocol):
    """What the tests, the CLI and the Triton model call."""

    dim: int  # embedding width
    max_seq_len: int  # longest document (tokens, specials included) the engine accepts
    precision: str  # fp32 | int8 | fp16 | bf16 | fp8 | fp64 (reference)

    def embed(self, token_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray: ...


def check_inputs(token_ids: np.ndarray, lengths: np.ndarray, max_seq_len: int, vocab_size: int) -> None:
    """Raise ``ValueError`` with a precise message when the packed inputs are inconsistent."""
    if token_ids.ndim != 1 or lengths.ndim != 1:
        raise ValueError(f"token_ids and lengths must be 1-D (got {token_ids.shape} and {lengths.shape})")
    if lengths.size and (lengths.min() < 1 or lengths.max() > max_seq_len):
        raise ValueError(f"every length must be in 1..{max_seq_len} (got {int(lengths.min())}..{int(lengths.max())})")
    if int(lengths.sum()) != token_ids.size:
        raise ValueError(f"sum(lengths)={int(lengths.sum())} does not match the {token_ids.size} token ids")
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= vocab_size):
        raise ValueError(f"token ids must be in 0..{vocab_size - 1}")


def packed_inputs(
    token_ids: np.ndarray, lengths: np.ndarray, max_seq_len: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The engine contract's inputs as int32 arrays, checked, plus each document's start offset.

    Returns (token_ids int32 [T], lengths int32 [B], offsets int64 [B + 1]).
    """
    token_ids = np.asarray(token_ids, dtype=np.int32)
    lengths = np.asarray(lengths, dtype=np.int32)
    check_inputs(token_ids, lengths, max_seq_len, vocab_size)
    return token_ids, lengths, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def split_packed(token_ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Packed tokens -> one array per document."""
    return np.split(token_ids, np.cumsum(lengths)[:-1]) if len(lengths) else []


def length_batches(lengths: np.ndarray, token_budget: int, max_batch: int) -> Iterator[np.ndarray]:
    """Indices of documents, grouped by length (sorted) so that rows x max length <= token budget.

    Padding-aware as TEI's queue is: a batch of n documents padded to length L costs n * L.
    A single document longer than the budget still gets a batch of its own.
    """
    order = np.argsort(lengths, kind="stable")
    start = 0
    n = len(order)
    while start < n:
        end = start + 1
        while end < n and end - start < max_batch and (end - start + 1) * int(lengths[order[end]]) <= token_budget:
            end += 1
        yield order[start:end]
        start = end
