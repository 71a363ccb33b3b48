"""Integration fixtures: a real tritonserver serving the default model, started once per session.

The model is built once (``built_fp32`` in tests/conftest.py), written into a Triton
repository with small per-request limits (so splitting is cheap to exercise) and served
twice in the same repository: ``fbas_encoder`` (FP32 output) and ``fbas_encoder_fp16``.
The server is polled for readiness; if it dies or never gets ready, every test using it
fails at once with the server's log tail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

# Small limits: 64 documents / 4096 tokens per request (a real deployment uses 1024 / 262144).
TEST_LIMITS = {"max_docs_per_request": 64, "max_tokens_per_request": 4096}


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def triton_repo(built_fp32: Path, tmp_path_factory) -> Path:
    from core.errors import ConfigError
    from services.repository import ModelEntryOptions, write_model_repository
    from services.triton import find_tritonserver

    try:
        find_tritonserver()
    except ConfigError as e:
        pytest.fail(f"{e} (the Triton integration tests need the real server)")
    repo = tmp_path_factory.mktemp("triton") / "repo"
    write_model_repository(built_fp32, repo, options=ModelEntryOptions(max_queue_delay_us=5000, **TEST_LIMITS))
    write_model_repository(
        built_fp32, repo, options=ModelEntryOptions(model_name="fbas_encoder_fp16", output_dtype="fp16", **TEST_LIMITS)
    )
    return repo


@pytest.fixture(scope="session")
def triton(triton_repo: Path, tmp_path_factory):
    """A running tritonserver on free loopback ports (shared by the session's tests)."""
    from services.triton import TritonProcess

    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    proc = TritonProcess(triton_repo, ready_timeout=180, log_file=log)
    proc.start()  # raises ServerExitedError / ServerUnavailableError with the log tail
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def reference_engine(built_fp32: Path):
    from engine.model_dir import load_engine

    return load_engine(built_fp32)


@pytest.fixture(scope="session")
def tokenizer(built_fp32: Path):
    from engine.model_dir import load_tokenizer

    return load_tokenizer(built_fp32)


@pytest.fixture(scope="session")
def real_texts() -> list[str]:
    """Real English sentences of varied length (the bundled calibration sample)."""
    path = ROOT / "engine" / "data" / "calibration.txt"
    return [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]


@pytest.fixture(scope="session")
def triton_docs(tokenizer, real_texts):
    """The first 96 texts tokenized (packed ids + lengths)."""
    return tokenizer.encode(real_texts[:96])


@pytest.fixture(scope="session")
def triton_docs_reference(reference_engine, triton_docs) -> np.ndarray:
    return reference_engine.embed(triton_docs.token_ids, triton_docs.lengths)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def _slice_docs(enc, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed ids and lengths of documents [start, end)."""
    offsets = np.concatenate([[0], np.cumsum(enc.lengths)])
    return enc.token_ids[offsets[start] : offsets[end]], enc.lengths[start:end]


@pytest.fixture(scope="session")
def min_cosine():
    """``min_cosine(a, b)``: the smallest row-wise cosine similarity of two [B, dim] arrays (float64)."""
    return _min_cosine


@pytest.fixture(scope="session")
def slice_docs():
    """``slice_docs(encoded, start, end)``: packed ids and lengths of documents [start, end)."""
    return _slice_docs


@pytest.fixture(scope="session")
def template_out(tmp_path_factory) -> Path:
    """An output folder holding the built default model (``seed_model`` copies it into each job's folder)."""
    from core.config import FbasConfig
    from core.layout import OutputDir
    from pipeline.ingest.model_cache import ensure_model

    out = tmp_path_factory.mktemp("template")
    ensure_model(FbasConfig(), OutputDir(out))
    return out
