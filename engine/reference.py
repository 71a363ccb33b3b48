"""The reference BERT encoder in plain NumPy: readable, float64-capable, the oracle for every engine.

Input is the engine contract: ``token_ids`` is every document's tokens back to back (int,
``[T]``), ``lengths`` is each document's token count (``[B]``, sum = T). Documents are
padded here only to use batched matrix products; padded keys are masked out of attention and
padded rows out of pooling, so results do not depend on the company a text keeps.
"""

from __future__ import annotations

import math

import numpy as np

from engine.checkpoint import BertShape

__all__ = ["ReferenceBert", "pad_tokens"]


def pad_tokens(token_ids: np.ndarray, lengths: np.ndarray, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Packed tokens -> (ids [B, S], mask [B, S] bool) with S = max(lengths)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    B, S = len(lengths), int(lengths.max(initial=0))
    mask = np.arange(S)[None, :] < lengths[:, None]  # [B, S]
    ids = np.full((B, S), pad_id, dtype=np.int64)
    ids[mask] = np.asarray(token_ids, dtype=np.int64)
    return ids, mask


try:  # NumPy has no erf: SciPy's when it is installed (the test extras bring it), else math.erf per element
    from scipy.special import erf as _fast_erf
except ImportError:  # the runtime install leaves SciPy out: exact too, about 6x slower
    _fast_erf = None
_ERF = np.frompyfunc(math.erf, 1, 1)


def _erf(x: np.ndarray) -> np.ndarray:
    if _fast_erf is not None:
        return _fast_erf(x)
    return _ERF(x).astype(x.dtype, copy=False)


def _gelu(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "relu":
        return np.maximum(x, 0)
    if kind in ("gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class ReferenceBert:
    """``embed(token_ids, lengths) -> [B, dim]`` with BERT's forward pass, one readable function.

    ``dtype`` float64 gives the oracle; float32 matches what fp32 engines should produce.
    """

    def __init__(
        self,
        shape: BertShape,
        weights: dict[str, np.ndarray],
        pooling: str,
        normalize: bool,
        max_seq_len: int,
        dtype: type[np.floating] = np.float64,
    ) -> None:
        self.shape, self.pooling, self.normalize, self.max_seq_len = shape, pooling, normalize, max_seq_len
        self.dtype = dtype
        self.w = {k: v.astype(dtype) for k, v in weights.items()}
        self.dim = shape.hidden_size
        self.precision = "fp64" if dtype == np.float64 else "fp32"

    def hidden_states(self, ids: np.ndarray, mask: np.ndarray, taps: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """ids [B, S], mask [B, S] -> last hidden state [B, S, H].

        ``taps``, when given, collects the per-channel max |input| of every dense layer over real
        (unpadded) tokens, keyed as ``engine.onnx_build.linear_names`` (int8 calibration uses it).
        """
        s, w = self.shape, self.w
        B, S = ids.shape
        nh, hd = s.num_heads, s.head_dim
        x = (
            w["embeddings.word_embeddings.weight"][ids]  # [B, S, H]
            + w["embeddings.position_embeddings.weight"][:S][None]  # [1, S, H]
            + w["embeddings.token_type_embeddings.weight"][0][None, None]
        )  # segment 0 only
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], s.layer_norm_eps)
        key_bias = np.where(mask, 0.0, -1e30).astype(self.dtype)[:, None, None, :]  # [B, 1, 1, S]

        def linear(t: np.ndarray, name: str, tap: str | None = None) -> np.ndarray:
            if taps is not None and tap is not None:
                rows = t[mask]  # [real tokens, in]
                amax = np.abs(rows).max(axis=0)  # [in]
                taps[tap] = np.maximum(taps.get(tap, amax), amax)
            return t @ w[name + ".weight"].T + w[name + ".bias"]

        for i in range(s.num_layers):
            p = f"encoder.layer.{i}."
            q, k, v = (
                linear(x, p + f"attention.self.{n}", p + "attention.qkv").reshape(B, S, nh, hd).transpose(0, 2, 1, 3)
                for n in ("query", "key", "value")
            )  # each [B, nh, S, hd]
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + key_bias  # [B, nh, S, S]
            scores = scores - scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(B, S, s.hidden_size)  # [B, S, H]
            x = _layer_norm(
                linear(ctx, p + "attention.output.dense", p + "attention.output.dense") + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                s.layer_norm_eps,
            )
            h = _gelu(linear(x, p + "intermediate.dense", p + "intermediate.dense"), s.hidden_act)  # [B, S, I]
            x = _layer_norm(
                linear(h, p + "output.dense", p + "output.dense") + x,
                w[p + "output.LayerNorm.weight"],
                w[p + "output.LayerNorm.bias"],
                s.layer_norm_eps,
            )
        return x

    def pool(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """[B, S, H] hidden states -> [B, H] pooled (and normalized when asked)."""
        m = mask[..., None].astype(self.dtype)  # [B, S, 1]
        if self.pooling == "mean":
            out = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        elif self.pooling == "max":
            out = np.where(m > 0, x, -1e30).max(1)
        elif self.pooling == "cls":
            out = x[:, 0]
        elif self.pooling == "pooler":
            out = np.tanh(x[:, 0] @ self.w["pooler.dense.weight"].T + self.w["pooler.dense.bias"])
        else:
            raise ValueError(f"unknown pooling {self.pooling!r}")
        if self.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return out

    def embed(self, token_ids: np.ndarray, lengths: np.ndarray, token_budget: int = 4096) -> np.ndarray:
        """Packed tokens + lengths -> embeddings [B, H] (this engine's dtype), in length-sorted sub-batches."""
        from engine.base import length_batches, split_packed

        lengths = np.asarray(lengths)
        docs = split_packed(np.asarray(token_ids), lengths)
        out = np.empty((len(lengths), self.dim), dtype=self.dtype)
        for idx in length_batches(lengths, token_budget, 64):
            ids, mask = pad_tokens(np.concatenate([docs[i] for i in idx]), lengths[idx])
            out[idx] = self.pool(self.hidden_states(ids, mask), mask)
        return out
