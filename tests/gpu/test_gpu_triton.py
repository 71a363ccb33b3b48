"""Served through Triton on the GPU: same vectors as in-process.

A ``--target gpu`` fp16 model folder is written into a Triton repository (``KIND_GPU``
instance group), served by a real tritonserver, and real text is sent through
``workers.triton_client.TritonEncoder`` (gRPC and HTTP). Every request's rows must match
``load_engine(folder, device="cuda:0").embed`` of the same documents in this process:

* requests sent one at a time run alone in the server, so the engine sees the same chunks,
  the same padded CUDA-graph shapes and the same kernels: min cosine >= 0.999999;
* concurrent requests are merged by Triton's dynamic batcher into one engine call, whose
  chunk has another padded shape (token bucket, documents, longest length) and GEMM row
  count than the request alone, so fp16 rounding may differ a little: min cosine >= 0.9999.

The model is ``$FBAS_GPU_TEST_MODEL`` (a Hugging Face BERT folder) when set, else the bundled
all-MiniLM-L6-v2 when its package is installed, else a random-weight BERT of MiniLM's shape
written here (config.json + model.safetensors + vocab.txt): what is tested is "Triton on the
GPU == in-process", not the model's quality, which the other GPU tests cover on real weights.

Skipped without CUDA or without tritonserver (``$FBAS_TRITONSERVER``, ``.venv/triton`` from
``deploy/install_triton.sh``, or ``tritonserver`` on PATH). ``test_gpu_folder_gets_kind_gpu``
needs neither and runs everywhere.
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline_support import settled_statistics

torch = pytest.importorskip("torch")

SEQUENTIAL_MIN_COSINE = 0.999999  # same engine, same chunks, same kernels
MERGED_MIN_COSINE = 0.9999  # merged batches: other padded shapes, fp16 rounding
MAX_SEQ_LEN = 256

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on an H100/H200)")


# --------------------------------------------------------------------------------------------------
# the model


def _words(texts: list[str]) -> list[str]:
    return [w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())]


def write_random_bert(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """A Hugging Face BERT folder of MiniLM's shape with random weights and a vocabulary made from ``texts``."""
    from safetensors.numpy import save_file

    from engine.checkpoint import BertShape, expected_shapes

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({c for w in _words(texts) for c in w})
    common = [w for w, _ in collections.Counter(_words(texts)).most_common(4000) if len(w) > 1]
    vocab = list(dict.fromkeys(special + chars + [f"##{c}" for c in chars] + common))
    cfg = {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": len(vocab),
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "pad_token_id": 0,
    }
    shape = BertShape.from_config(cfg, "random")
    rng = np.random.default_rng(seed)
    weights = {}
    for name, dims in expected_shapes(shape, with_pooler=False).items():
        if name.endswith("LayerNorm.weight"):
            w = 1.0 + 0.05 * rng.standard_normal(dims)
        elif name.endswith("bias") or name.endswith("LayerNorm.bias"):
            w = 0.02 * rng.standard_normal(dims)
        else:
            w = 0.05 * rng.standard_normal(dims)
        weights[name] = w.astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}), encoding="utf-8")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def _source_model(tmp: Path, texts: list[str], real: bool) -> tuple[str, dict]:
    """(checkpoint folder, EngineSpec overrides): $FBAS_GPU_TEST_MODEL, the bundled model, or random weights."""
    from core.errors import CheckpointError
    from engine.checkpoint import default_model_path

    if real and os.environ.get("FBAS_GPU_TEST_MODEL"):
        return os.environ["FBAS_GPU_TEST_MODEL"], {}
    if real:
        try:
            return str(default_model_path()), {}
        except CheckpointError:
            pass
    folder = write_random_bert(tmp / "random-bert", texts)
    return str(folder), {"pooling": "mean", "normalize": True, "max_seq_len": MAX_SEQ_LEN}


def build_gpu_folder(tmp: Path, texts: list[str], real: bool = True) -> Path:
    from core.config import EngineSpec
    from engine.build import build_model

    model, extra = _source_model(tmp, texts, real)
    return build_model(EngineSpec(model=model, target="gpu", precision="fp16", **extra), tmp / "gpu-fp16")


def texts_for_test() -> list[str]:
    """Real text (the bundled calibration sample) plus long documents made by joining it."""
    from engine.calibration import calibration_texts

    texts = calibration_texts(limit=1000)
    return texts + [" ".join(texts[i * 12 : (i + 1) * 12]) for i in range(16)]


# --------------------------------------------------------------------------------------------------
# the repository entry (no GPU needed)


def test_gpu_folder_gets_kind_gpu(tmp_path):
    """A gpu-target folder is written with a KIND_GPU instance group (instance_kind overrides it)."""
    from services.repository import ModelEntryOptions, write_model_repository

    folder = build_gpu_folder(tmp_path, texts_for_test()[:64], real=False)
    entry = write_model_repository(folder, tmp_path / "repo", options=ModelEntryOptions())
    config = (entry / "config.pbtxt").read_text(encoding="utf-8")
    assert re.search(r"kind:\s*KIND_GPU", config), config
    assert (entry / "1" / "engine" / "weights.safetensors").is_file()
    assert (entry / "1" / "model.py").is_file()
    entry = write_model_repository(folder, tmp_path / "repo2", options=ModelEntryOptions(instance_kind="KIND_CPU"))
    assert re.search(r"kind:\s*KIND_CPU", (entry / "config.pbtxt").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# served on the GPU


@pytest.fixture(scope="module")
def tritonserver_path() -> str | None:
    from core.errors import ConfigError
    from services.triton import find_tritonserver

    explicit = os.environ.get("FBAS_TRITONSERVER") or None
    try:
        find_tritonserver(explicit)
    except ConfigError as e:
        pytest.skip(f"tritonserver is not installed: {e}")
    return explicit


@pytest.fixture(scope="module")
def gpu_folder(tmp_path_factory) -> Path:
    return build_gpu_folder(tmp_path_factory.mktemp("gpu-model"), texts_for_test())


@pytest.fixture(scope="module")
def docs(gpu_folder):
    from engine.model_dir import load_tokenizer

    return load_tokenizer(gpu_folder).encode(texts_for_test())


@pytest.fixture(scope="module")
def served(gpu_folder, tritonserver_path, tmp_path_factory):
    """tritonserver serving the gpu folder (KIND_GPU, device 0) on free loopback ports; yields (process, log)."""
    from services.repository import ModelEntryOptions, write_model_repository
    from services.triton import TritonProcess

    root = tmp_path_factory.mktemp("triton-gpu")
    entry = write_model_repository(gpu_folder, root / "repo", options=ModelEntryOptions(max_queue_delay_us=5000))
    assert re.search(r"kind:\s*KIND_GPU", (entry / "config.pbtxt").read_text(encoding="utf-8"))
    log = root / "tritonserver.log"
    proc = TritonProcess(root / "repo", ready_timeout=300, tritonserver=tritonserver_path, log_file=log)
    proc.start()  # raises with the server's log tail if the model fails to load
    yield proc, log
    proc.stop()


@pytest.fixture(scope="module")
def in_process(gpu_folder):
    from engine.model_dir import load_engine

    return load_engine(gpu_folder, device="cuda:0")


def _requests(docs, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive groups of ``sizes`` documents (cycled until every document is in one), as packed arrays."""
    offsets = np.concatenate([[0], np.cumsum(docs.lengths, dtype=np.int64)])
    out, start, k = [], 0, 0
    n = len(docs.lengths)
    while start < n:
        end = min(n, start + sizes[k % len(sizes)])
        out.append((docs.token_ids[offsets[start] : offsets[end]], docs.lengths[start:end]))
        start, k = end, k + 1
    return out


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def _encoder(proc, protocol: str):
    from workers.triton_client import ClientOptions, TritonEncoder

    if protocol == "grpc" and not _has_grpc():
        pytest.skip("the gRPC client needs grpcio and tritonclient[grpc] (protobuf, python-rapidjson)")
    url = proc.grpc_url if protocol == "grpc" else proc.http_url
    return TritonEncoder(ClientOptions(url=url, protocol=protocol, ready_timeout=60))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_gpu_matches_in_process(served, in_process, docs, protocol):
    """One request at a time: Triton's rows equal the in-process engine's for the same documents."""
    proc, log = served
    enc = _encoder(proc, protocol)
    try:
        info = enc.wait_ready()
        assert info.dim == in_process.dim and info.precision == "fp16"
        before = enc.model_statistics()
        reqs = _requests(docs, [1, 3, 8, 16, 33, 64, 100])
        worst, max_abs = 1.0, 0.0
        for ids, lens in reqs:
            got = np.array(enc.embed(ids, lens))
            want = in_process.embed(ids, lens)
            assert got.shape == want.shape == (lens.size, in_process.dim)
            assert np.isfinite(got).all()
            worst = min(worst, _min_cosine(got, want))
            max_abs = max(max_abs, float(np.abs(got - want).max()))
        after = settled_statistics(enc, before, len(reqs))
    finally:
        enc.close()
    print(
        f"\n[triton-gpu {protocol}] {len(reqs)} requests, {len(docs.lengths)} docs, lengths "
        f"{int(docs.lengths.min())}..{int(docs.lengths.max())}: min cosine {worst:.9f}, max |diff| {max_abs:.3g}; "
        f"stats {after['inference_count']} inferences / {after['execution_count']} executions on "
        f"{torch.cuda.get_device_name(0)}"
    )
    assert worst >= SEQUENTIAL_MIN_COSINE, f"min cosine {worst} < {SEQUENTIAL_MIN_COSINE}"
    assert after["inference_count"] - before["inference_count"] == len(reqs)
    assert 1 <= after["execution_count"] - before["execution_count"] <= len(reqs)
    server_log = log.read_text(encoding="utf-8", errors="replace")
    assert " on cuda:0 in " in server_log, f"the model instance did not load on the GPU:\n{proc.log_tail()}"


@needs_cuda
@pytest.mark.gpu
@pytest.mark.integration
def test_triton_gpu_merged_batches_match_in_process(served, in_process, docs):
    """Concurrent requests (merged by the dynamic batcher) still match the in-process engine."""
    proc, _ = served
    enc = _encoder(proc, "grpc" if _has_grpc() else "http")
    reqs = _requests(docs, [5, 12, 31, 7, 64, 2, 20])
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(k, len(reqs), 8):
                results[i] = np.array(enc.embed(*reqs[i]))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        enc.wait_ready()
        before = enc.model_statistics()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        after = settled_statistics(enc, before, len(reqs))
    finally:
        enc.close()
    assert not errors, errors
    assert sorted(results) == list(range(len(reqs)))
    worst = min(_min_cosine(results[i], in_process.embed(*reqs[i])) for i in range(len(reqs)))
    executions = after["execution_count"] - before["execution_count"]
    print(f"\n[triton-gpu merged] {len(reqs)} concurrent requests in {executions} executions: min cosine {worst:.9f}")
    assert worst >= MERGED_MIN_COSINE, f"min cosine {worst} < {MERGED_MIN_COSINE}"
    assert after["inference_count"] - before["inference_count"] == len(reqs)
    assert 1 <= executions <= len(reqs)


def _has_grpc() -> bool:
    try:
        import grpc  # noqa: F401
        import tritonclient.grpc  # noqa: F401
    except (ImportError, RuntimeError):  # tritonclient.grpc raises RuntimeError when a dependency is missing
        return False
    return True
