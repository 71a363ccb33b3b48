"""Quality: the engine reproduces MTEB's published all-MiniLM-L6-v2 scores (cosine Spearman)."""

from __future__ import annotations

import json

import numpy as np
from scipy.stats import spearmanr

from engine.model_dir import load_engine, load_tokenizer


def sts_spearman(model_dir, pairs) -> float:
    eng, tok = load_engine(model_dir, threads=2), load_tokenizer(model_dir)
    texts = sorted({t for a, b, _ in pairs for t in (a, b)})
    enc = tok.encode(texts)
    vecs = dict(zip(texts, eng.embed(enc.token_ids, enc.lengths).astype(np.float64)))
    a = np.stack([vecs[p[0]] for p in pairs])
    b = np.stack([vecs[p[1]] for p in pairs])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(spearmanr(cos, [p[2] for p in pairs]).statistic)


def published(shared_data, file: str, split: str = "test") -> float:
    data = json.loads((shared_data / "published_scores" / file).read_text())
    return float(data["scores"][split][0]["cosine_spearman"])


def test_stsb_english_fp32(built_fp32, stsb_en_test, shared_data):
    ref = published(shared_data, "sentence-transformers__all-MiniLM-L6-v2__STSBenchmark.json")
    assert abs(ref - 0.82032) < 1e-4
    got = sts_spearman(built_fp32, stsb_en_test)
    assert abs(got - ref) <= 0.001, f"STS-B en Spearman {got:.5f}, MTEB {ref:.5f}"


def test_stsb_chinese_fp32(built_fp32, stsb_zh_cnsd_test, shared_data):
    ref = published(shared_data, "sentence-transformers__all-MiniLM-L6-v2__STSB.json")
    got = sts_spearman(built_fp32, stsb_zh_cnsd_test)
    assert abs(got - ref) <= 0.002, f"Chinese STS-B Spearman {got:.5f}, MTEB {ref:.5f}"


def test_stsb_english_int8(built_int8, stsb_en_test, shared_data):
    ref = published(shared_data, "sentence-transformers__all-MiniLM-L6-v2__STSBenchmark.json")
    got = sts_spearman(built_int8, stsb_en_test)
    assert abs(got - ref) <= 0.005, f"int8 STS-B en Spearman {got:.5f}, MTEB {ref:.5f}"
