"""Build an ONNX BERT encoder directly from checkpoint weights, layer by layer.

No exporter, no PyTorch: each layer is written node by node, as the original service's
TensorRT builder did, using ONNX Runtime's fused transformer ops where they pay:

    EmbedLayerNormalization   gather(word) + position (+ segment 0 folded in) + LayerNorm
    Attention                 QKV projection + scaled-dot-product with key-length mask
    SkipLayerNormalization    residual add + bias + LayerNorm
    BiasGelu                  bias add + exact (erf) GELU

Each fusion can be switched off (``Fusions``) to fall back on standard ONNX ops, because on
CPU a fused op is not always faster (BENCHMARKS.md records which are). int8 uses
``DynamicQuantizeMatMul`` with per-output-channel int8 weights for the layers that the
calibration plan (``engine/quantize.py``) marks; every other op stays in float.

Graph contract:  input_ids int32 [batch, seq] (right-padded), lengths int32 [batch]
             ->  embedding float32 [batch, hidden] (pooled, optionally L2-normalized)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.checkpoint import BertShape

__all__ = ["Fusions", "GraphSpec", "build_onnx", "linear_names"]

MS = "com.microsoft"


@dataclass(frozen=True)
class Fusions:
    """Which ORT fused ops to use (True) or spell out with standard ops (False)."""

    embed_layernorm: bool = True
    attention: bool = True
    skip_layernorm: bool = True
    bias_gelu: bool = True

    @classmethod
    def parse(cls, text: str) -> Fusions:
        """``"all"``, ``"none"`` or a comma list of the enabled fusions, e.g. ``"skip_layernorm,bias_gelu"``."""
        if text == "all":
            return cls()
        if text == "none":
            return cls(False, False, False, False)
        names = {t.strip() for t in text.split(",") if t.strip()}
        unknown = names - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fusion(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**{n: n in names for n in cls.__dataclass_fields__})

    def label(self) -> str:
        on = [n for n in self.__dataclass_fields__ if getattr(self, n)]
        return ",".join(on) if on else "none"


@dataclass
class GraphSpec:
    """Everything that decides the graph: pooling, normalize, fusions, which linears are int8."""

    pooling: str
    normalize: bool
    fusions: Fusions = field(default_factory=Fusions)
    int8_linears: frozenset[str] = frozenset()  # names from linear_names(); empty = fp32
    smooth: dict[str, np.ndarray] = field(default_factory=dict)  # int8: per-input-channel scale s (SmoothQuant)


def linear_names(shape: BertShape) -> list[str]:
    """The names of every dense layer in the encoder (candidates for int8)."""
    names = []
    for i in range(shape.num_layers):
        p = f"encoder.layer.{i}."
        names += [p + "attention.qkv", p + "attention.output.dense", p + "intermediate.dense", p + "output.dense"]
    return names


class _Graph:
    """A tiny helper that names nodes and initializers uniquely."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(arr, order="C"), name))  # keeps 0-d scalars 0-d
        return name

    def op(
        self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None, **attrs
    ) -> list[str]:
        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = [f"{base}_out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], **kw) -> str:
        return self.op(op_type, inputs, 1, **kw)[0]


def _linear(
    g: _Graph,
    x: str,
    w_out_in: np.ndarray,
    b: np.ndarray,
    name: str,
    int8: bool,
    with_bias: bool = True,
    smooth: np.ndarray | None = None,
) -> str:
    """x @ W^T (+ b). int8: per-output-channel symmetric weights, dynamic per-tensor activations.

    ``smooth`` (int8 only) moves activation outliers into the weights: x/s @ (s*W), exact in float.
    """
    w = w_out_in.T.astype(np.float32)  # [in, out] for MatMul
    if int8:
        if smooth is not None:
            x = g.op1("Mul", [x, g.const(name + ".inv_s", (1.0 / smooth).astype(np.float32))])
            w = w * smooth[:, None].astype(np.float32)
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0  # [out]
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        inputs = [
            x,
            g.const(name + ".wq", q),
            g.const(name + ".scale", scale.astype(np.float32)),
            g.const(name + ".zp", np.zeros_like(q[0])),
        ]
        if with_bias:
            inputs.append(g.const(name + ".b", b.astype(np.float32)))
        return g.op1("DynamicQuantizeMatMul", inputs, domain=MS, name=name)
    y = g.op1("MatMul", [x, g.const(name + ".w", w)], name=name)
    if with_bias:
        y = g.op1("Add", [y, g.const(name + ".b", b.astype(np.float32))])
    return y


def _layer_norm(g: _Graph, x: str, w: np.ndarray, b: np.ndarray, eps: float, name: str) -> str:
    return g.op1(
        "LayerNormalization", [x, g.const(name + ".g", w), g.const(name + ".beta", b)], axis=-1, epsilon=eps, name=name
    )


def _gelu(g: _Graph, x: str, kind: str) -> str:
    if kind == "relu":
        return g.op1("Relu", [x])
    if kind in ("gelu_new", "gelu_pytorch_tanh"):
        return g.op1("FastGelu", [x], domain=MS)
    half = g.op1("Mul", [x, "c_half"])
    erf = g.op1("Erf", [g.op1("Mul", [x, "c_inv_sqrt2"])])
    return g.op1("Mul", [half, g.op1("Add", [erf, "c_one"])])


def _plain_attention(g: _Graph, qkv: str, key_bias: str, s: BertShape) -> str:
    """Scaled dot-product attention with standard ops. qkv [B,S,3H] -> ctx [B,S,H]."""
    nh, hd, H = s.num_heads, s.head_dim, s.hidden_size
    shaped = g.op1("Reshape", [qkv, g.const(f"qkv_shape_{g._n}", np.array([0, 0, 3, nh, hd], np.int64))])
    perm = g.op1("Transpose", [shaped], perm=[2, 0, 3, 1, 4])  # [3, B, nh, S, hd]
    q, k, v = g.op("Split", [perm, "c_split3"], n_out=3, axis=0)  # each [1, B, nh, S, hd]
    q, k, v = (g.op1("Squeeze", [t, "c_axis0"]) for t in (q, k, v))
    kt = g.op1("Transpose", [k], perm=[0, 1, 3, 2])  # [B, nh, hd, S]
    scores = g.op1(
        "Mul", [g.op1("MatMul", [q, kt]), g.const(f"c_scale_{g._n}", np.array(1.0 / math.sqrt(hd), np.float32))]
    )
    probs = g.op1("Softmax", [g.op1("Add", [scores, key_bias])], axis=-1)  # [B, nh, S, S]
    ctx = g.op1("Transpose", [g.op1("MatMul", [probs, v])], perm=[0, 2, 1, 3])  # [B, S, nh, hd]
    return g.op1("Reshape", [ctx, g.const(f"ctx_shape_{g._n}", np.array([0, 0, H], np.int64))])


@dataclass(frozen=True)
class _Build:
    """What every section of the graph reads: the builder, the shape, the weights and the spec."""

    g: _Graph
    shape: BertShape
    w: dict[str, np.ndarray]
    spec: GraphSpec

    def int8(self, linear: str) -> bool:
        """Whether the dense layer ``linear`` (a name from ``linear_names``) is built in int8."""
        return linear in self.spec.int8_linears

    def smooth(self, linear: str) -> np.ndarray | None:
        """The SmoothQuant scale for ``linear``, if the calibration plan gave one."""
        return self.spec.smooth.get(linear)


def build_onnx(shape: BertShape, weights: dict[str, np.ndarray], spec: GraphSpec) -> onnx.ModelProto:
    """Write the encoder graph for these weights. Returns an in-memory ``ModelProto``."""
    gb = _Build(_Graph(), shape, weights, spec)
    _add_constants(gb.g)
    mask = _length_mask(gb.g)  # [B, S] float
    x = _embeddings(gb)  # [B, S, H]
    key_bias = None
    if (
        not spec.fusions.attention
    ):  # only the spelled-out attention needs the additive mask (int8 uses MultiHeadAttention)
        key_bias = _key_bias(gb.g, mask)
    for i in range(shape.num_layers):
        x = _encoder_layer(gb, f"encoder.layer.{i}.", x, key_bias)
    _pooled_output(gb, x, mask)
    return _make_model(gb.g, shape.hidden_size)


def _add_constants(g: _Graph) -> None:
    """The shared scalar and axis initializers (``c_*``) that later nodes refer to by name."""
    for name, val in (
        ("c_half", 0.5),
        ("c_one", 1.0),
        ("c_inv_sqrt2", 1.0 / math.sqrt(2.0)),
        ("c_eps", 1e-12),
        ("c_neg", -10000.0),
    ):
        g.const(name, np.array(val, np.float32))
    g.const("c_axis0", np.array([0], np.int64))
    g.const("c_axis1", np.array([1], np.int64))
    g.const("c_axis_last", np.array([-1], np.int64))
    g.const("c_split3", np.array([1, 1, 1], np.int64))
    g.const("c_zero_i64", np.array(0, np.int64))
    g.const("c_one_i64", np.array(1, np.int64))


def _length_mask(g: _Graph) -> str:
    """The padding mask from the graph inputs: mask[b, s] = 1.0 if s < lengths[b] else 0.0, [B, S] float."""
    seq_len = g.op1("Gather", [g.op1("Shape", ["input_ids"]), "c_one_i64"], axis=0)
    positions = g.op1("Range", ["c_zero_i64", seq_len, "c_one_i64"])  # [S] int64
    lengths64 = g.op1("Cast", ["lengths"], to=TensorProto.INT64)
    valid = g.op1(
        "Less", [g.op1("Unsqueeze", [positions, "c_axis0"]), g.op1("Unsqueeze", [lengths64, "c_axis1"])]
    )  # [B, S] bool
    return g.op1("Cast", [valid], to=TensorProto.FLOAT)


def _key_bias(g: _Graph, mask: str) -> str:
    """The additive attention mask for plain attention: 0 or -10000, [B, 1, 1, S]."""
    kb = g.op1("Mul", [g.op1("Sub", ["c_one", mask]), "c_neg"])  # [B, S]
    return g.op1("Unsqueeze", [kb, g.const("c_axes12", np.array([1, 2], np.int64))])


def _embeddings(gb: _Build) -> str:
    """Word + position embeddings and their LayerNorm: input_ids [B, S] -> x [B, S, H].

    Segment 0 only: token_type_embeddings[0] is folded into the position table (exact).
    """
    g, w, eps = gb.g, gb.w, gb.shape.layer_norm_eps
    pos_table = (
        w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0][None]
    ).astype(np.float32)
    word = g.const("emb.word", w["embeddings.word_embeddings.weight"])
    pos = g.const("emb.pos", pos_table)
    if gb.spec.fusions.embed_layernorm:
        return g.op(
            "EmbedLayerNormalization",
            [
                "input_ids",
                "",
                word,
                pos,
                "",
                g.const("emb.ln.g", w["embeddings.LayerNorm.weight"]),
                g.const("emb.ln.b", w["embeddings.LayerNorm.bias"]),
            ],
            n_out=2,
            domain=MS,
            epsilon=eps,
            name="embed_ln",
        )[0]
    ids64 = g.op1("Cast", ["input_ids"], to=TensorProto.INT64)
    tok = g.op1("Gather", [word, ids64], axis=0)  # [B, S, H]
    seq_1d = g.op1("Slice", [g.op1("Shape", ["input_ids"]), "c_axis1", g.const("c_two_1d", np.array([2], np.int64))])
    pos_s = g.op1("Slice", [pos, g.const("c_zero_1d", np.array([0], np.int64)), seq_1d, "c_axis0"])  # [S, H]
    return _layer_norm(
        g, g.op1("Add", [tok, pos_s]), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps, "emb.ln"
    )


def _encoder_layer(gb: _Build, p: str, x: str, key_bias: str | None) -> str:
    """One transformer layer (weights under prefix ``p``): x [B, S, H] -> [B, S, H]."""
    ctx = _self_attention(gb, p, x, key_bias)  # [B, S, H]
    x = _dense_residual_ln(gb, p + "attention.output", ctx, x)
    h = _intermediate(gb, p, x)  # [B, S, I]
    return _dense_residual_ln(gb, p + "output", h, x)


def _self_attention(gb: _Build, p: str, x: str, key_bias: str | None) -> str:
    """QKV projection and multi-head attention: x [B, S, H] -> context [B, S, H].

    Fused and float: one ``Attention`` op. int8 QKV: the projection as a quantized linear,
    then ``MultiHeadAttention`` on the float Q, K, V. Unfused: standard ops (``key_bias`` masks).
    """
    g, s = gb.g, gb.shape
    H = s.hidden_size
    wq = np.concatenate([gb.w[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")])  # [3H, H]
    bq = np.concatenate([gb.w[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])  # [3H]
    qkv_name = p + "attention.qkv"
    qkv_int8 = gb.int8(qkv_name)
    if gb.spec.fusions.attention and not qkv_int8:
        return g.op1(
            "Attention",
            [x, g.const(p + "qkv.w", wq.T.copy()), g.const(p + "qkv.b", bq), "lengths"],
            domain=MS,
            num_heads=s.num_heads,
            name=p + "attention",
        )
    qkv = _linear(g, x, wq, bq, qkv_name, qkv_int8, smooth=gb.smooth(qkv_name))  # [B, S, 3H]
    if not gb.spec.fusions.attention:
        assert key_bias is not None, "the unfused attention's mask is built whenever that fusion is off"
        return _plain_attention(g, qkv, key_bias, s)
    q, k, v = g.op("Split", [qkv, g.const(p + "qkv.split", np.array([H, H, H], np.int64))], n_out=3, axis=-1)
    return g.op1("MultiHeadAttention", [q, k, v, "", "lengths"], domain=MS, num_heads=s.num_heads, name=p + "attention")


def _dense_residual_ln(gb: _Build, name: str, inp: str, residual: str) -> str:
    """LayerNorm(inp @ W^T + bias + residual) for the block ``name``: [B, S, in] -> [B, S, H].

    ``name`` is ``<layer>.attention.output`` or ``<layer>.output``; its weights sit under that prefix.
    """
    dense = name + ".dense"
    return _residual_ln(
        gb.g,
        inp,
        residual,
        gb.w[dense + ".weight"],
        gb.w[dense + ".bias"],
        gb.w[name + ".LayerNorm.weight"],
        gb.w[name + ".LayerNorm.bias"],
        gb.shape.layer_norm_eps,
        name,
        gb.int8(dense),
        gb.spec.fusions.skip_layernorm,
        gb.smooth(dense),
    )


def _intermediate(gb: _Build, p: str, x: str) -> str:
    """The feed-forward up-projection and activation: x [B, S, H] -> [B, S, I] (``BiasGelu`` when fused)."""
    g, act = gb.g, gb.shape.hidden_act
    name = p + "intermediate.dense"
    wi, bi = gb.w[name + ".weight"], gb.w[name + ".bias"]
    if gb.spec.fusions.bias_gelu and act == "gelu":
        h = _linear(g, x, wi, bi, name, gb.int8(name), with_bias=False, smooth=gb.smooth(name))
        return g.op1("BiasGelu", [h, g.const(name + ".bgelu", bi)], domain=MS)
    return _gelu(g, _linear(g, x, wi, bi, name, gb.int8(name), smooth=gb.smooth(name)), act)


def _pooled_output(gb: _Build, x: str, mask: str) -> None:
    """Pooling, optional L2 normalization and the ``embedding`` output node: x [B, S, H] -> [B, H]."""
    g = gb.g
    pooled = _pool(g, x, mask, gb.spec.pooling, gb.w)
    if gb.spec.normalize:
        norm = g.op1("ReduceL2", [pooled, "c_axis_last"], keepdims=1)  # [B, 1]
        pooled = g.op1("Div", [pooled, g.op1("Max", [norm, "c_eps"])])
    g.nodes.append(helper.make_node("Identity", [pooled], ["embedding"], name="output"))


def _make_model(g: _Graph, hidden: int) -> onnx.ModelProto:
    """Wrap the nodes and initializers in a graph with the contract's inputs and output, and a model."""
    graph = helper.make_graph(
        g.nodes,
        "fbas_bert",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "seq"]),
            helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])],
        g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)],
        producer_name="faster-bert-as-service",
    )
    model.ir_version = 8
    return model


def _residual_ln(
    g: _Graph,
    inp: str,
    residual: str,
    w_out_in: np.ndarray,
    b: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float,
    name: str,
    int8: bool,
    fused: bool,
    smooth: np.ndarray | None = None,
) -> str:
    """LayerNorm(inp @ W^T + b + residual), with SkipLayerNormalization when fused."""
    if fused:
        y = _linear(g, inp, w_out_in, b, name + ".dense", int8, with_bias=False, smooth=smooth)
        return g.op1(
            "SkipLayerNormalization",
            [y, residual, g.const(name + ".ln.g", gamma), g.const(name + ".ln.b", beta), g.const(name + ".ln.bias", b)],
            domain=MS,
            epsilon=eps,
            name=name + ".skipln",
        )
    y = _linear(g, inp, w_out_in, b, name + ".dense", int8, smooth=smooth)
    return _layer_norm(g, g.op1("Add", [y, residual]), gamma, beta, eps, name + ".ln")


def _pool(g: _Graph, x: str, mask: str, pooling: str, w: dict[str, np.ndarray]) -> str:
    """[B, S, H] -> [B, H]."""
    if pooling in ("cls", "pooler"):
        cls = g.op1("Gather", [x, "c_zero_i64"], axis=1)
        if pooling == "cls":
            return cls
        y = g.op1(
            "Add",
            [
                g.op1("MatMul", [cls, g.const("pooler.w", w["pooler.dense.weight"].T.copy())]),
                g.const("pooler.b", w["pooler.dense.bias"]),
            ],
        )
        return g.op1("Tanh", [y])
    m3 = g.op1("Unsqueeze", [mask, "c_axis_last"])  # [B, S, 1]
    if pooling == "mean":
        summed = g.op1("ReduceSum", [g.op1("Mul", [x, m3]), "c_axis1"], keepdims=0)  # [B, H]
        count = g.op1(
            "Max", [g.op1("ReduceSum", [m3, "c_axis1"], keepdims=0), g.const("c_min_count", np.array(1e-9, np.float32))]
        )  # [B, 1]
        return g.op1("Div", [summed, count])
    if pooling == "max":
        neg = g.op1("Mul", [g.op1("Sub", ["c_one", m3]), g.const("c_big_neg", np.array(-1e30, np.float32))])
        return g.op1("ReduceMax", [g.op1("Add", [x, neg]), "c_axis1"], keepdims=0)
    raise ValueError(f"unknown pooling {pooling!r}")
