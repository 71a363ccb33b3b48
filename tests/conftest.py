"""Shared fixtures: the repository root, the evaluation data (``tests/data``), built model folders."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download weights at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


DATA = ROOT / "tests" / "data"  # real evaluation data, with sources and licences: tests/data/README.md


def _shared_data() -> Path | None:
    for cand in (os.environ.get("FBAS_SHARED_DATA"), DATA):
        if cand and Path(cand, "stsb_en").is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = _shared_data()
    if path is None:
        pytest.fail(f"evaluation data not found: {DATA} is part of the repository (or set FBAS_SHARED_DATA)")
    return path


def read_stsb_multi(path: Path) -> list[tuple[str, str, float]]:
    """stsb-multi-mt CSV: sentence1, sentence2, score (0-5)."""
    with open(path, encoding="utf-8", newline="") as f:
        return [(r[0], r[1], float(r[2])) for r in csv.reader(f)]


def read_cnsd(path: Path) -> list[tuple[str, str, float]]:
    """CNSD STS-B: tab separated sentence1, sentence2, integer score."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                rows.append((parts[0], parts[1], float(parts[2])))
    return rows


@pytest.fixture(scope="session")
def stsb_en_test(shared_data: Path) -> list[tuple[str, str, float]]:
    return read_stsb_multi(shared_data / "stsb_multi_mt" / "stsb-en-test.csv")


@pytest.fixture(scope="session")
def stsb_zh_cnsd_test(shared_data: Path) -> list[tuple[str, str, float]]:
    return read_cnsd(shared_data / "stsb_zh_cnsd" / "STS-B.test.data")


@pytest.fixture(scope="session")
def default_checkpoint():
    from engine.checkpoint import load_checkpoint

    return load_checkpoint(None)


@pytest.fixture(scope="session")
def built_fp32(tmp_path_factory) -> Path:
    """The default model (all-MiniLM-L6-v2) built for the ONNX target in fp32."""
    from core.config import EngineSpec
    from engine.build import build_model

    return build_model(EngineSpec(), tmp_path_factory.mktemp("models") / "minilm-fp32")


@pytest.fixture(scope="session")
def built_int8(tmp_path_factory) -> Path:
    """The default model built in int8 with the bundled calibration sample (about a minute on 2 cores)."""
    from core.config import EngineSpec
    from engine.build import build_model

    return build_model(
        EngineSpec(precision="int8"),
        tmp_path_factory.mktemp("models") / "minilm-int8",
        int8_target=0.998,
        calibration_size=128,
    )


LISTING = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)\n"


@pytest.fixture
def two_gpu_host(tmp_path, monkeypatch):
    """A host that shows two H100s: a stand-in nvidia-smi first on PATH (CPU machines have none)."""
    import stat

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncat <<'EOF'\n" + LISTING + "EOF\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture(scope="session")
def wordpiece_lib():
    """The C WordPiece library (``dll/build/libfbas_wordpiece.so``), built here when ``make setup`` has not;
    skips only where no C compiler exists."""
    import shutil
    import subprocess

    from dll import wordpiece

    if not wordpiece.LIB_PATH.exists():
        if shutil.which(os.environ.get("CC", "cc")) is None:
            pytest.skip("no C compiler to build dll/build/libfbas_wordpiece.so")
        subprocess.run(["bash", str(ROOT / "dll" / "build_wordpiece.sh")], check=True)
    lib = wordpiece.load_library(wordpiece.LIB_PATH)
    assert lib is not None, f"{wordpiece.LIB_PATH} does not load"
    return lib
