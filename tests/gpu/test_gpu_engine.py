"""The GPU engine end to end: parity with Hugging Face transformers (fp32) on real text,
batch invariance, graphs vs eager, and a built ``--target gpu`` folder loaded by ``load_engine``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on an H100/H200)")

MIN_COSINE = {"fp16": 0.9999, "bf16": 0.9999, "fp8": 0.99}
# fp8: the goal is 0.999; all-MiniLM-L6-v2 on real text measures ~0.994 (mean 0.998) with
# every QKV/FFN GEMM in fp8, and ~0.998 with even one of them; see test_fp8_reaches_the_goal_cosine.


def hf_model(ck):
    """transformers' BertModel in fp32 on the GPU with the checkpoint's canonical weights."""
    from transformers import BertConfig, BertModel

    s = ck.shape
    cfg = BertConfig(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        intermediate_size=s.intermediate_size,
        max_position_embeddings=s.max_position,
        type_vocab_size=s.type_vocab_size,
        layer_norm_eps=s.layer_norm_eps,
        hidden_act=s.hidden_act,
    )
    model = BertModel(cfg, add_pooling_layer="pooler.dense.weight" in ck.weights)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in ck.weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    return model.float().cuda().eval()


def hf_embed(model, ck, enc, pooling: str, normalize: bool, batch: int = 64) -> np.ndarray:
    """HF forward in fp32 (TF32 off), padded batches with an attention mask, then our pooling rules."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    offsets = np.concatenate([[0], np.cumsum(enc.lengths)])
    out = []
    for a in range(0, len(enc.lengths), batch):
        lens = enc.lengths[a : a + batch]
        S = int(lens.max())
        ids = torch.zeros(len(lens), S, dtype=torch.long)
        mask = torch.zeros(len(lens), S, dtype=torch.long)
        for r, i in enumerate(range(a, a + len(lens))):
            ids[r, : lens[r]] = torch.from_numpy(enc.token_ids[offsets[i] : offsets[i + 1]].astype(np.int64))
            mask[r, : lens[r]] = 1
        with torch.inference_mode():
            res = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), token_type_ids=torch.zeros_like(ids).cuda())
        h, m = res.last_hidden_state.double(), mask.cuda()[..., None].double()
        if pooling == "mean":
            v = (h * m).sum(1) / m.sum(1)
        elif pooling == "cls":
            v = h[:, 0]
        elif pooling == "max":
            v = h.masked_fill(m == 0, -1e30).amax(1)
        else:
            v = res.pooler_output.double()
        if normalize:
            v = v / v.norm(dim=-1, keepdim=True)
        out.append(v.cpu().numpy())
    return np.concatenate(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def make_engine(ck, precision: str, pooling: str = "mean", normalize: bool = True, **opts):
    from engine.torch_gpu import GpuBertEngine, GpuOptions

    return GpuBertEngine(
        ck.shape,
        ck.weights,
        pooling=pooling,
        normalize=normalize,
        max_seq_len=512,
        precision=precision,
        device="cuda",
        options=GpuOptions(**opts),
    )


@pytest.fixture(scope="module")
def hf(checkpoint):
    return hf_model(checkpoint)


@pytest.fixture(scope="module")
def hf_mean(hf, checkpoint, encoded):
    return hf_embed(hf, checkpoint, encoded, "mean", True)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp8"])
@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_parity_with_transformers_fp32_on_real_text(checkpoint, encoded, hf_mean, precision, kernels):
    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    try:
        eng = make_engine(checkpoint, precision, kernels=kernels)
    except RuntimeError as e:  # the CUDA C++ library not built here
        pytest.skip(str(e))
    got = eng.embed(encoded.token_ids, encoded.lengths)
    cos = cosines(got.astype(np.float64), hf_mean)
    print(f"{precision}/{kernels}: min cosine {cos.min():.6f}, mean {cos.mean():.7f} over {len(cos)} texts")
    assert cos.min() >= MIN_COSINE[precision]
    assert encoded.lengths.max() > 300


@pytest.mark.xfail(
    reason="fp8 (e4m3, per-token x per-channel scales) reaches min cosine ~0.994 on "
    "all-MiniLM-L6-v2, short of the 0.999 goal; no e4m3 scaling (blocks included) reaches "
    "0.999 on this model (benchmarks/studies/fp8_scaling_study.py, BENCHMARKS.md)",
    strict=False,
)
def test_fp8_reaches_the_goal_cosine(checkpoint, encoded, hf_mean):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    got = make_engine(checkpoint, "fp8").embed(encoded.token_ids, encoded.lengths)
    assert cosines(got.astype(np.float64), hf_mean).min() >= 0.999


@pytest.mark.parametrize("pooling,normalize", [("cls", False), ("max", False), ("pooler", True)])
def test_parity_other_poolings_fp16(checkpoint, encoded, hf, pooling, normalize):
    if pooling == "pooler" and "pooler.dense.weight" not in checkpoint.weights:
        pytest.skip("no pooler weights")
    want = hf_embed(hf, checkpoint, encoded, pooling, normalize)
    got = make_engine(checkpoint, "fp16", pooling, normalize).embed(encoded.token_ids, encoded.lengths)
    assert cosines(got.astype(np.float64), want).min() >= 0.9999


@pytest.mark.parametrize(
    "opts",
    [dict(gelu_epilogue=False), dict(residual_in_gemm=True), dict(residual_in_gemm=True, kernels="cuda")],
    ids=str,
)
def test_runtime_options_keep_parity(checkpoint, encoded, hf_mean, opts):
    try:
        eng = make_engine(checkpoint, "fp16", **opts)
    except RuntimeError as e:  # the CUDA C++ library not built here
        pytest.skip(str(e))
    cos = cosines(eng.embed(encoded.token_ids, encoded.lengths).astype(np.float64), hf_mean)
    print(f"fp16 {opts}: min cosine {cos.min():.7f}")
    assert cos.min() >= 0.9999


@pytest.mark.parametrize("precision", ["fp16", "fp8"])
def test_batch_invariance(checkpoint, encoded, precision):
    """A text alone, in its batch, and in a shuffled batch of other company gives the same vector."""
    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    eng = make_engine(checkpoint, precision)
    offsets = np.concatenate([[0], np.cumsum(encoded.lengths)])
    full = eng.embed(encoded.token_ids, encoded.lengths)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(encoded.lengths))
    shuffled_ids = np.concatenate([encoded.token_ids[offsets[i] : offsets[i + 1]] for i in order])
    shuffled = eng.embed(shuffled_ids, encoded.lengths[order])
    back = np.empty_like(shuffled)
    back[order] = shuffled
    tol = 1e-2 if precision == "fp8" else 2e-3
    assert np.abs(back - full).max() < tol
    assert cosines(back, full).min() > (0.9999 if precision == "fp8" else 0.99999)
    for i in (0, 7, len(encoded.lengths) - 1):
        alone = eng.embed(encoded.token_ids[offsets[i] : offsets[i + 1]], encoded.lengths[i : i + 1])[0]
        assert np.abs(alone - full[i]).max() < tol


def test_cuda_graphs_match_eager(checkpoint, encoded):
    n = 300
    ids, lens = encoded.token_ids[: int(encoded.lengths[:n].sum())], encoded.lengths[:n]
    engine = make_engine(checkpoint, "fp16")
    graphs = engine.embed(ids, lens)
    captured = engine.captures
    assert captured >= 1 and engine.capture_s > 0
    assert np.array_equal(engine.embed(ids, lens), graphs) and engine.captures == captured, "no shape is new"
    eager = make_engine(checkpoint, "fp16", cuda_graphs=False).embed(ids, lens)
    assert np.abs(graphs - eager).max() < 2e-3
    assert cosines(graphs, eager).min() > 0.99999


def test_twin_kernels_on_gpu_match_fused(checkpoint, encoded):
    n = 200
    ids, lens = encoded.token_ids[: int(encoded.lengths[:n].sum())], encoded.lengths[:n]
    fused = make_engine(checkpoint, "fp16").embed(ids, lens)
    twin = make_engine(checkpoint, "fp16", kernels="torch").embed(ids, lens)
    assert cosines(fused, twin).min() > 0.99999


def test_built_gpu_folder_loads_through_load_engine(checkpoint, encoded, tmp_path, hf_mean):
    from core.config import EngineSpec
    from engine.build import build_model
    from engine.model_dir import load_engine, load_tokenizer

    folder = build_model(
        EngineSpec(model=str(checkpoint.path), target="gpu", precision="fp16", max_seq_len=512), tmp_path / "gpu_model"
    )
    eng = load_engine(folder, device="cuda")
    assert eng.precision == "fp16" and eng.dim == checkpoint.shape.hidden_size
    enc = load_tokenizer(folder).encode(["A man is playing a guitar.", "A woman slices an onion."])
    v = eng.embed(enc.token_ids, enc.lengths)
    assert v.shape == (2, eng.dim) and np.isfinite(v).all()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-3)
