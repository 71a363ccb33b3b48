"""Engine correctness on real text: ONNX vs the NumPy reference and vs Hugging Face transformers."""

from __future__ import annotations

import numpy as np
import pytest

from core.tokenize import Tokenizer, tokenizer_json_for
from engine.model_dir import load_engine, load_tokenizer, read_meta
from engine.onnx_build import Fusions, GraphSpec, build_onnx
from engine.onnx_engine import OnnxEngine
from engine.reference import ReferenceBert


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def sentences(stsb_en_test, stsb_zh_cnsd_test) -> list[str]:
    """A real mix: 160 English STS-B test sentences, 40 Chinese CNSD ones, a few long texts."""
    en = [a for a, _, _ in stsb_en_test[:160]]
    zh = [a for a, _, _ in stsb_zh_cnsd_test[:40]]
    long = [" ".join(b for _, b, _ in stsb_en_test[i : i + 40]) for i in range(0, 80, 40)]
    return en + zh + long


@pytest.fixture(scope="module")
def encoded(default_checkpoint, sentences):
    tok = Tokenizer(tokenizer_json_for(default_checkpoint.tokenizer), default_checkpoint.default_max_seq_len)
    enc = tok.encode(sentences)
    assert enc.truncated.any(), "the long texts should exercise truncation at 256 tokens"
    return enc


@pytest.fixture(scope="module")
def reference64(default_checkpoint, encoded) -> np.ndarray:
    ck = default_checkpoint
    ref = ReferenceBert(ck.shape, ck.weights, "mean", True, 256, dtype=np.float64)
    return ref.embed(encoded.token_ids, encoded.lengths)


@pytest.fixture(scope="module")
def hf_transformers(default_checkpoint, sentences) -> np.ndarray:
    """all-MiniLM-L6-v2 through transformers' BertModel (fp32, eager), mean-pooled and normalized."""
    torch = pytest.importorskip("torch", reason="torch (test extra) runs the Hugging Face oracle")
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) is the oracle")
    path = str(default_checkpoint.path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), 32):
            batch = tok(sentences[i : i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out)


def test_reference_matches_transformers(reference64, hf_transformers):
    assert cosines(reference64, hf_transformers).min() >= 0.99999


@pytest.mark.parametrize("fusions", ["all", "none", "attention", "embed_layernorm,skip_layernorm,bias_gelu"])
def test_onnx_fp32_matches_reference_and_transformers(
    default_checkpoint, encoded, reference64, hf_transformers, fusions
):
    ck = default_checkpoint
    model = build_onnx(ck.shape, ck.weights, GraphSpec("mean", True, Fusions.parse(fusions)))
    eng = OnnxEngine(model.SerializeToString(), 384, 256, ck.shape.vocab_size, threads=2)
    got = eng.embed(encoded.token_ids, encoded.lengths)
    assert got.shape == (len(encoded), 384) and got.dtype == np.float32
    assert cosines(got, reference64).min() >= 0.99999
    assert cosines(got, hf_transformers).min() >= 0.99999


@pytest.mark.parametrize("pooling,normalize", [("cls", False), ("max", True), ("pooler", False)])
def test_every_pooling_matches_reference(default_checkpoint, encoded, pooling, normalize):
    ck = default_checkpoint
    weights = dict(ck.weights)
    if pooling == "pooler":  # MiniLM ships no pooler: give it one (deterministic) to test the graph
        rng = np.random.default_rng(0)
        weights["pooler.dense.weight"] = rng.normal(0, 0.05, (384, 384)).astype(np.float32)
        weights["pooler.dense.bias"] = rng.normal(0, 0.05, 384).astype(np.float32)
    sub = slice(0, 64)
    ids, lens = encoded.token_ids[: int(encoded.lengths[sub].sum())], encoded.lengths[sub]
    ref = ReferenceBert(ck.shape, weights, pooling, normalize, 256).embed(ids, lens)
    eng = OnnxEngine(
        build_onnx(ck.shape, weights, GraphSpec(pooling, normalize)).SerializeToString(),
        384,
        256,
        ck.shape.vocab_size,
        threads=2,
    )
    got = eng.embed(ids, lens)
    assert cosines(got, ref).min() >= 0.99999
    if not normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-4)


def test_built_fp32_folder(built_fp32, encoded, reference64):
    meta = read_meta(built_fp32)
    assert (meta.target, meta.precision, meta.pooling, meta.normalize, meta.max_seq_len) == (
        "onnx",
        "fp32",
        "mean",
        True,
        256,
    )
    eng = load_engine(built_fp32, threads=2)
    tok = load_tokenizer(built_fp32)
    assert cosines(eng.embed(encoded.token_ids, encoded.lengths), reference64).min() >= 0.99999
    assert tok.max_seq_len == 256


def test_int8_matches_fp32(built_int8, encoded, reference64):
    meta = read_meta(built_int8)
    plan = meta.options["int8"]
    assert meta.precision == "int8" and plan["int8_linears"], "calibration must keep some layers in int8"
    got = load_engine(built_int8, threads=2).embed(encoded.token_ids, encoded.lengths)
    c = cosines(got, reference64)
    assert c.min() >= 0.99, f"int8 min cosine {c.min():.5f}"


def test_batch_invariance(built_fp32, default_checkpoint):
    """A text alone and inside a batch of much longer texts gives the same vector."""
    eng = load_engine(built_fp32, threads=2, token_budget=1 << 20)  # one padded batch: worst case
    tok = load_tokenizer(built_fp32)
    short = "A man is playing a guitar."
    long = ["The quick brown fox jumps over the lazy dog near the river bank. " * 12] * 5
    alone = eng.embed(*_enc(tok, [short]))
    mixed = eng.embed(*_enc(tok, long[:2] + [short] + long[2:]))
    np.testing.assert_allclose(mixed[2], alone[0], atol=2e-6)
    assert cosines(mixed[2:3], alone)[0] >= 0.999999


def _enc(tok, texts):
    e = tok.encode(texts)
    return e.token_ids, e.lengths


def test_tf_checkpoint_engine_matches_reference():
    from pathlib import Path

    from engine.checkpoint import load_checkpoint

    ck = load_checkpoint(Path(__file__).resolve().parents[1] / "fixtures" / "tf_bert_tiny")
    tok = Tokenizer(tokenizer_json_for(ck.tokenizer), 64)
    enc = tok.encode(["我是中国人", "他不在上海。", "hello world", "我们 在 学 习"])
    ref = ReferenceBert(ck.shape, ck.weights, "pooler", False, 64).embed(enc.token_ids, enc.lengths)
    model = build_onnx(ck.shape, ck.weights, GraphSpec("pooler", False, Fusions.parse("all")))
    got = OnnxEngine(model.SerializeToString(), 32, 64, ck.shape.vocab_size, threads=1).embed(
        enc.token_ids, enc.lengths
    )
    assert cosines(got, ref).min() >= 0.99999


def test_engine_rejects_inconsistent_inputs(built_fp32):
    eng = load_engine(built_fp32, threads=1)
    with pytest.raises(ValueError, match="does not match"):
        eng.embed(np.array([101, 2000, 102], np.int32), np.array([4], np.int32))
    with pytest.raises(ValueError, match="every length must be in 1..256"):
        eng.embed(np.zeros(300, np.int32), np.array([300], np.int32))
    with pytest.raises(ValueError, match="token ids must be in"):
        eng.embed(np.array([101, 10**6, 102], np.int32), np.array([3], np.int32))
