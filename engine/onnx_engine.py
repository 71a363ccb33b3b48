"""Run a built ONNX encoder with ONNX Runtime (CPU), behind the ``Engine`` interface."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engine.base import length_batches, packed_inputs

logger = logging.getLogger(__name__)

__all__ = ["OnnxEngine", "session_options"]


def session_options(threads: int):
    """ORT session options: all graph optimizations, ``threads`` intra-op threads, sequential."""
    import onnxruntime as ort

    from core.envs import cpu_count

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or cpu_count()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


class OnnxEngine:
    """``embed(token_ids, lengths)`` on an ONNX graph from ``engine.onnx_build``.

    Documents are sorted by length and cut into padded sub-batches of at most ``token_budget``
    tokens (rows x longest row), so short texts are not padded to the length of long ones.
    """

    def __init__(
        self,
        model: str | Path | bytes,
        dim: int,
        max_seq_len: int,
        vocab_size: int,
        precision: str = "fp32",
        threads: int = 0,
        token_budget: int = 2048,
        max_batch: int = 256,
        pad_id: int = 0,
    ) -> None:
        import onnxruntime as ort

        src = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(src, session_options(threads), providers=["CPUExecutionProvider"])
        self.dim, self.max_seq_len, self.vocab_size, self.precision = dim, max_seq_len, vocab_size, precision
        self.token_budget, self.max_batch, self.pad_id = token_budget, max_batch, pad_id

    def embed(self, token_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        token_ids, lengths, offsets = packed_inputs(token_ids, lengths, self.max_seq_len, self.vocab_size)
        out = np.empty((len(lengths), self.dim), dtype=np.float32)
        for idx in length_batches(lengths, self.token_budget, self.max_batch):
            sub_len = lengths[idx]
            S = int(sub_len.max())
            ids = np.full((len(idx), S), self.pad_id, dtype=np.int32)
            for r, d in enumerate(idx):
                ids[r, : sub_len[r]] = token_ids[offsets[d] : offsets[d + 1]]
            out[idx] = self.session.run(["embedding"], {"input_ids": ids, "lengths": sub_len})[0]
        return out
