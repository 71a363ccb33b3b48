"""int8 calibration: choose which dense layers run in int8, on real text, to a cosine target.

ONNX Runtime's stock dynamic quantization (every MatMul, per-tensor weights) loses too much
accuracy against fp32 on small sentence-embedding models. Here instead:

1. weights are quantized per output channel (symmetric int8), activations per tensor at run
   time (``DynamicQuantizeMatMul``); embeddings, attention softmax, LayerNorm, GELU, pooling
   and normalization always stay in float;
2. activation outliers are moved into the weights (SmoothQuant): per input channel j,
   ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` from the calibration sample's activations
   (measured with the NumPy reference), and the layer computes ``(X / s) @ (s * W)``;
3. each dense layer's sensitivity is measured alone on a calibration sample of real text
   (mean cosine loss vs the fp32 graph);
4. the most sensitive layers are kept in float, the fewest needed for the sample's min
   cosine to reach ``target`` (binary search over that count).

The plan (the int8 layer names) and the measured cosines are stored in the model metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from engine.checkpoint import BertShape
from engine.onnx_build import GraphSpec, build_onnx, linear_names
from engine.onnx_engine import OnnxEngine

logger = logging.getLogger(__name__)

__all__ = ["Int8Plan", "calibrate_int8"]


@dataclass
class Int8Plan:
    int8_linears: list[str]
    float_linears: list[str]
    min_cosine: float
    mean_cosine: float
    n_calibration_texts: int
    alpha: float  # SmoothQuant migration strength
    smooth: dict[str, np.ndarray]

    def to_dict(self) -> dict:
        """JSON-ready summary for the model metadata (the scales themselves live in the graph)."""
        return {k: v for k, v in self.__dict__.items() if k != "smooth"}

    def graph_spec(self, base: GraphSpec) -> GraphSpec:
        return GraphSpec(base.pooling, base.normalize, base.fusions, frozenset(self.int8_linears), self.smooth)


def smoothing_scales(
    shape: BertShape, weights: dict[str, np.ndarray], token_ids: np.ndarray, lengths: np.ndarray, alpha: float = 0.7
) -> dict[str, np.ndarray]:
    """Per-input-channel SmoothQuant scales for every dense layer, from real activations.

    alpha = 0.7: of the values tried, the one that keeps an all-int8 graph closest to fp32 end to end
    (min cosine on real text); weaker or stronger smoothing does worse.
    """
    from engine.reference import ReferenceBert, pad_tokens

    ref = ReferenceBert(shape, weights, "cls", False, int(lengths.max()), dtype=np.float32)
    taps: dict[str, np.ndarray] = {}
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for start in range(0, len(lengths), 32):
        stop = min(start + 32, len(lengths))
        ids, mask = pad_tokens(token_ids[offsets[start] : offsets[stop]], lengths[start:stop])
        ref.hidden_states(ids, mask, taps)
    scales = {}
    for name in linear_names(shape):
        if name.endswith("attention.qkv"):
            p = name[: -len("qkv")] + "self."
            w = np.concatenate([weights[p + n + ".weight"] for n in ("query", "key", "value")])  # [3H, H]
        else:
            w = weights[name + ".weight"]  # [out, in]
        w_amax = np.abs(w).max(axis=0)  # [in]
        s = np.power(np.maximum(taps[name], 1e-5), alpha) / np.power(np.maximum(w_amax, 1e-5), 1 - alpha)
        scales[name] = np.clip(s, 1e-2, 1e2).astype(np.float32)
    return scales


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def calibrate_int8(
    shape: BertShape,
    weights: dict[str, np.ndarray],
    spec: GraphSpec,
    token_ids: np.ndarray,
    lengths: np.ndarray,
    max_seq_len: int,
    target: float = 0.995,
    threads: int = 0,
    alpha: float = 0.7,
    progress=None,
) -> Int8Plan:
    """Find the int8 plan for these weights on the calibration sample (token_ids, lengths).

    ``progress(done, total)``, when given, is called after each layer's sensitivity run.
    """
    smooth = smoothing_scales(shape, weights, token_ids, lengths, alpha)

    def run(int8: set[str]) -> np.ndarray:
        s = GraphSpec(spec.pooling, spec.normalize, spec.fusions, frozenset(int8), smooth)
        eng = OnnxEngine(
            build_onnx(shape, weights, s).SerializeToString(),
            shape.hidden_size,
            max_seq_len,
            shape.vocab_size,
            "int8" if int8 else "fp32",
            threads=threads,
            token_budget=4096,
        )
        return eng.embed(token_ids, lengths)

    names = linear_names(shape)
    ref = run(set())
    loss: dict[str, float] = {}
    for done, name in enumerate(names, 1):
        loss[name] = float(1.0 - _cosines(run({name}), ref).mean())
        if progress:
            progress(done, len(names))
    by_sensitivity = sorted(names, key=lambda n: loss[n], reverse=True)

    def quality(k_float: int) -> tuple[float, float]:
        c = _cosines(run(set(by_sensitivity[k_float:])), ref)
        return float(c.min()), float(c.mean())

    lo, hi = 0, len(names)  # smallest k_float whose min cosine reaches target lies in [lo, hi]
    cache: dict[int, tuple[float, float]] = {len(names): (1.0, 1.0)}
    while lo < hi:
        mid = (lo + hi) // 2
        cache[mid] = quality(mid)
        if cache[mid][0] >= target:
            hi = mid
        else:
            lo = mid + 1
    k = lo
    min_c, mean_c = cache[k]  # k is len(names) or a count the search evaluated
    plan = Int8Plan(sorted(by_sensitivity[k:]), sorted(by_sensitivity[:k]), min_c, mean_c, len(lengths), alpha, smooth)
    logger.info(
        "int8 plan: %d of %d dense layers in int8, calibration min cosine %.5f",
        len(plan.int8_linears),
        len(names),
        min_c,
    )
    return plan
