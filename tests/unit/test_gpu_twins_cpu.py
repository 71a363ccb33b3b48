"""The GPU engine's PyTorch-twin path on the CPU, in fp32, against the NumPy reference.

The same runtime (engine/torch_gpu.py) runs here with the twins of every fused kernel
(engine/gpu_kernels.py TorchKernels) on real text: all-MiniLM-L6-v2 on STS-B sentences.
Also: the CUDA-graph padding plan (dummy documents) gives the same vectors, a text alone and
inside a batch gives the same vector, and the twins agree with plain per-document formulas.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from core.tokenize import Tokenizer, tokenizer_json_for
from dll.twins import TorchKernels
from engine.checkpoint import BertShape, load_checkpoint  # noqa: E402
from engine.gpu_kernels import quantize_rows_fp8
from engine.reference import ReferenceBert, pad_tokens  # noqa: E402
from engine.torch_gpu import GpuBertEngine, GpuOptions, static_plan, token_bucket  # noqa: E402

STSB = ROOT.parent / "shared" / "data" / "stsb_multi_mt" / "stsb-en-test.csv"
CALIBRATION = ROOT / "engine" / "data" / "calibration.txt"


def real_texts(n: int) -> list[str]:
    """n real sentences: STS-B English test (shared data) or the bundled calibration text."""
    if STSB.exists():
        with open(STSB, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        texts = [t for r in rows for t in r[:2]]
    else:
        texts = [t.strip() for t in CALIBRATION.read_text(encoding="utf-8").splitlines() if t.strip()]
    return texts[:n]


class ReferenceOnGroups:
    """The float64 oracle's last hidden states, computed once on length-sorted groups of 16
    (it pads each call to its longest), then pooled any way a test asks."""

    def __init__(self, ck, enc) -> None:
        self.ref = ReferenceBert(ck.shape, ck.weights, "mean", True, ck.default_max_seq_len, dtype=np.float64)
        self.n, self.dim = len(enc.lengths), ck.shape.hidden_size
        offsets = np.concatenate([[0], np.cumsum(enc.lengths)])
        order = np.argsort(enc.lengths, kind="stable")
        self.groups = []
        for g in range(0, len(order), 16):
            idx = order[g : g + 16]
            ids = np.concatenate([enc.token_ids[offsets[i] : offsets[i + 1]] for i in idx])
            padded, mask = pad_tokens(ids, enc.lengths[idx])
            self.groups.append((idx, self.ref.hidden_states(padded, mask), mask))

    def embed(self, pooling: str, normalize: bool) -> np.ndarray:
        self.ref.pooling, self.ref.normalize = pooling, normalize
        out = np.empty((self.n, self.dim))
        for idx, hidden, mask in self.groups:
            out[idx] = self.ref.pool(hidden, mask)
        return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.fixture(scope="module")
def minilm():
    ck = load_checkpoint(None)
    tok = Tokenizer(tokenizer_json_for(ck.tokenizer), ck.default_max_seq_len)
    return ck, tok


@pytest.fixture(scope="module")
def reference(minilm, encoded):
    return ReferenceOnGroups(minilm[0], encoded)


@pytest.fixture(scope="module")
def encoded(minilm):
    ck, tok = minilm
    texts = real_texts(96)
    # one long text too, so attention over ~200 tokens is covered
    texts.append(" ".join(real_texts(400)[200:240]))
    return tok.encode(texts)


def engine_for(ck, pooling: str, normalize: bool, **opts) -> GpuBertEngine:
    return GpuBertEngine(
        ck.shape,
        ck.weights,
        pooling=pooling,
        normalize=normalize,
        max_seq_len=ck.default_max_seq_len,
        precision="fp32",
        device="cpu",
        options=GpuOptions(**opts),
    )


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", False), ("pooler", True)])
def test_twin_path_matches_reference_on_real_text(minilm, encoded, reference, pooling, normalize):
    ck, _ = minilm
    want = reference.embed(pooling, normalize)
    eng = engine_for(ck, pooling, normalize)
    got = eng.embed(encoded.token_ids, encoded.lengths)
    assert got.dtype == np.float32 and got.shape == (len(encoded), ck.shape.hidden_size)
    assert eng.precision == "fp32" and eng.kernels.name == "torch"
    cos = cosines(got.astype(np.float64), want)
    assert cos.min() >= 0.99999, f"min cosine {cos.min():.7f}"
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert encoded.lengths.max() > 150


def test_graph_padding_plan_gives_the_same_vectors(minilm, encoded):
    ck, _ = minilm
    plain = engine_for(ck, "mean", True).embed(encoded.token_ids, encoded.lengths)
    padded = engine_for(ck, "mean", True, max_tokens=1024)
    padded.use_static_padding()
    got = padded.embed(encoded.token_ids, encoded.lengths)
    assert cosines(got, plain).min() >= 0.999999
    assert np.abs(got - plain).max() < 1e-5


def test_fp16_rows_are_the_float32_rows_rounded(minilm, encoded):
    """A server with fp16 outputs has the engine round on the device (half the bytes to the host): the rows
    must be exactly the float32 rows rounded to float16, as the host rounding gave before."""
    ck, _ = minilm
    eng = engine_for(ck, "mean", True)
    full = eng.embed(encoded.token_ids, encoded.lengths)
    half = eng.embed(encoded.token_ids, encoded.lengths, out_dtype=np.float16)
    assert half.dtype == np.float16 and half.shape == full.shape
    np.testing.assert_array_equal(half, full.astype(np.float16))
    with pytest.raises(ValueError, match="float32 or float16"):
        eng.embed(encoded.token_ids, encoded.lengths, out_dtype=np.int8)


def test_a_text_alone_and_inside_a_batch_gives_the_same_vector(minilm, encoded):
    ck, _ = minilm
    eng = engine_for(ck, "mean", True)
    batch = eng.embed(encoded.token_ids, encoded.lengths)
    offsets = np.concatenate([[0], np.cumsum(encoded.lengths)])
    for i in (0, 5, len(encoded) - 1):
        alone = eng.embed(encoded.token_ids[offsets[i] : offsets[i + 1]], encoded.lengths[i : i + 1])
        np.testing.assert_allclose(alone[0], batch[i], atol=2e-6)


def test_chunks_split_between_documents(minilm, encoded):
    ck, _ = minilm
    whole = engine_for(ck, "cls", False).embed(encoded.token_ids, encoded.lengths)
    small = engine_for(ck, "cls", False, max_tokens=300, max_docs=7)
    spans = small._chunks(np.concatenate([[0], np.cumsum(encoded.lengths, dtype=np.int64)]))
    assert spans[0][0] == 0 and spans[-1][1] == len(encoded) and len(spans) > 5
    assert all(a < b and b - a <= 7 for a, b in spans)
    np.testing.assert_allclose(small.embed(encoded.token_ids, encoded.lengths), whole, atol=2e-6)


def test_bad_inputs_are_rejected_with_a_message(minilm):
    ck, _ = minilm
    eng = engine_for(ck, "mean", True)
    with pytest.raises(ValueError, match="sum\\(lengths\\)"):
        eng.embed(np.array([101, 102], np.int32), np.array([3], np.int32))
    with pytest.raises(ValueError, match="every length"):
        eng.embed(np.zeros(300, np.int32), np.array([300], np.int32))
    assert eng.embed(np.zeros(0, np.int32), np.zeros(0, np.int32)).shape == (0, ck.shape.hidden_size)


def test_fp8_emulation_with_smoothing_calibration(minilm, encoded):
    """fp8 on the CPU: the twins quantize GEMM operands (per token x per channel) as the GPU does."""
    from engine.calibration import calibration_texts

    ck, tok = minilm
    cal = tok.encode(calibration_texts())
    want = engine_for(ck, "mean", True).embed(encoded.token_ids, encoded.lengths)
    eng = GpuBertEngine(
        ck.shape,
        ck.weights,
        pooling="mean",
        normalize=True,
        max_seq_len=256,
        precision="fp8",
        device="cpu",
        options=GpuOptions(fp8_gemms="qkv,ffn2"),
        calibration=(cal.token_ids, cal.lengths),
    )
    assert eng.fp8 and set(eng.layers[0].fp8) == {"qkv", "ffn2"}
    assert eng.layers[0].fp8["qkv"][0].dtype == torch.float8_e4m3fn and eng.layers[0].fp8["qkv"][2] is not None
    cos = cosines(eng.embed(encoded.token_ids, encoded.lengths), want)
    assert 0.99 < cos.min() < 0.99999  # fp8 rounding is visible, and small


def test_gpu_precisions_fall_back_to_fp32_on_the_cpu(minilm):
    ck, _ = minilm
    eng = GpuBertEngine(
        ck.shape, ck.weights, pooling="mean", normalize=True, max_seq_len=128, precision="fp16", device="cpu"
    )
    assert eng.precision == "fp32" and eng.dtype == torch.float32


# --- the padding plan --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_static_plan_covers_every_padding_token_with_short_dummy_documents(seed):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 200, size=int(rng.integers(1, 300))).astype(np.int32)
    cap = token_bucket(int(lens.sum()) + 5000, int(lens.sum()) + 5000)
    Tb, Lb, all_lens = static_plan(lens, cap, 256)
    assert Tb >= lens.sum() and all_lens.sum() == Tb and Tb <= cap
    assert Tb <= max(64, 1.25 * lens.sum() + 16)
    assert np.array_equal(all_lens[: len(lens)], lens)
    assert all_lens.max() <= Lb <= 256 and Lb >= lens.max()
    n = len(all_lens)
    assert n >= 8 and n & (n - 1) == 0


def test_token_buckets_are_few_and_tight():
    buckets = {token_bucket(t, 1 << 15) for t in range(1, (1 << 15) + 1)}
    assert len(buckets) < 50
    for t in (65, 100, 1000, 1025, 5000, 32767):
        b = token_bucket(t, 1 << 15)
        assert t <= b <= 1.25 * t + 16


# --- twins against plain formulas ----------------------------------------------------------------


def test_attention_twin_matches_per_document_softmax():
    g = torch.Generator().manual_seed(0)
    lens = [5, 1, 0, 17, 9]
    T, nh, hd = sum(lens), 3, 8
    q, k, v = (torch.randn(T, nh, hd, generator=g) for _ in range(3))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    got = TorchKernels().varlen_attention(q, k, v, cu, max(lens), 1 / math.sqrt(hd))
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        s = torch.einsum("qhd,khd->hqk", q[sl], k[sl]) / math.sqrt(hd)
        want = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[sl])
        torch.testing.assert_close(got[sl], want, atol=1e-5, rtol=1e-5)
        start += n


def test_pool_twin_modes_and_empty_documents():
    x = torch.randn(10, 4)
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    tk = TorchKernels()
    torch.testing.assert_close(tk.pool(x, cu, "mean", False, 7)[0], x[:3].mean(0))
    torch.testing.assert_close(tk.pool(x, cu, "max", False, 7)[2], x[3:].amax(0))
    torch.testing.assert_close(tk.pool(x, cu, "cls", False, 7)[2], x[3])
    for mode in ("mean", "max", "cls"):
        assert torch.equal(tk.pool(x, cu, mode, True, 7)[1], torch.zeros(4))
    n = tk.pool(x, cu, "mean", True, 7)
    torch.testing.assert_close(n[0], x[:3].mean(0) / x[:3].mean(0).norm())


def test_layernorm_twin_without_residual_is_plain_layernorm():
    x, b, g, beta = torch.randn(5, 16), torch.randn(16), torch.randn(16), torch.randn(16)
    got = TorchKernels().bias_residual_layernorm(x, b, None, g, beta, 1e-5)
    torch.testing.assert_close(got, torch.nn.functional.layer_norm(x + b, (16,), g, beta, 1e-5))


def test_fp8_row_quantization_round_trips_within_fp8_precision():
    y = torch.randn(16, 64) * torch.logspace(-3, 3, 16)[:, None]
    q, s = quantize_rows_fp8(y)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (16, 1)
    err = (q.float() * s - y).abs() / y.abs().amax(1, keepdim=True)
    assert err.max() < 2**-4  # e4m3: 3 mantissa bits


def test_scaled_mm_twin_is_a_dequantized_product():
    a, w = torch.randn(8, 32), torch.randn(16, 32)
    aq, as_ = quantize_rows_fp8(a)
    wq, ws = quantize_rows_fp8(w)
    got = TorchKernels().scaled_mm(aq, as_, wq, ws.reshape(1, -1), None, torch.float32)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), (a @ w.t()).flatten(), dim=0)
    assert cos > 0.99


def test_shape_validation():
    shape = BertShape(
        vocab_size=10,
        hidden_size=8,
        num_layers=0,
        num_heads=2,
        intermediate_size=16,
        max_position=16,
        hidden_act="swish",
    )
    with pytest.raises(ValueError, match="hidden_act"):
        GpuBertEngine(shape, {}, pooling="mean", normalize=True, max_seq_len=8, precision="fp32", device="cpu")


def test_the_reference_erf_without_scipy_is_exact(monkeypatch):
    """The runtime install has no SciPy: the reference's erf then falls back on math.erf, equal to SciPy's."""
    import scipy.special

    import engine.reference as ref

    x = np.linspace(-6, 6, 20001)
    monkeypatch.setattr(ref, "_fast_erf", None)
    assert np.abs(ref._erf(x) - scipy.special.erf(x)).max() < 1e-15
    assert ref._erf(x.astype(np.float32)).dtype == np.float32
