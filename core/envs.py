"""Every environment variable the project reads, in one place.

Each config field ``section.name`` can be given by the variable ``FBAS_<NAME>`` (upper
case); the CLI flag wins over the variable, the variable over the default. Nothing else in
the code base calls ``os.environ`` for settings (child processes get their environment
built explicitly by the code that starts them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PREFIX = "FBAS_"

# FBAS_* variables that are not config fields: where the test data is, and hooks the tests use to pause, crash
# or slow a worker or the Triton model (``tests/``, ``workers/task.py``, ``model_repository/model.py``); the C
# WordPiece tokenizer's off switch (``FBAS_WORDPIECE=0``, ``dll/wordpiece.py``).
NOT_SETTINGS = frozenset(
    {
        "shared_data",
        "gpu_test_model",
        "test_pause",
        "test_crash",
        "test_load_delay",
        "wordpiece",
        "wordpiece_parity_texts",
    }
)


def env_name(field_name: str) -> str:
    """The environment variable that sets a config field, e.g. ``max_seq_len`` -> ``FBAS_MAX_SEQ_LEN``."""
    return PREFIX + field_name.upper()


def read_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """All ``FBAS_*`` variables, keyed by lower-case field name (``FBAS_MAX_SEQ_LEN`` -> ``max_seq_len``)."""
    source = os.environ if environ is None else environ
    return {k[len(PREFIX) :].lower(): v for k, v in source.items() if k.startswith(PREFIX) and v != ""}


def cpu_count() -> int:
    """Cores this process may use (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


BLAS_KERNEL = "OPENBLAS_CORETYPE"  # OpenBLAS's kernel family, read when the library loads
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}  # what OpenBLAS's SkylakeX kernels use


def faiss_blas_kernel(cpu_flags: set[str], environ: Mapping[str, str] | None = None) -> str | None:
    """The OpenBLAS kernel family for a CPU with ``cpu_flags`` (``/proc/cpuinfo``'s), or None to leave OpenBLAS's
    own choice (it is set already, or the CPU has neither AVX-512 nor AVX2).

    Why: faiss-cpu's wheels bundle OpenBLAS 0.3.15, which predates Sapphire Rapids. FAISS's coarse assignment is
    a matrix product through it: on the H100 host (Sapphire Rapids, 8 threads, 7 cores held) it ran 131,726
    vectors a second left to itself and 559,760 with "SkylakeX" (one idle thread: 20,668 with "Prescott", its
    fallback, and 139,478), so the ivfpq index cost that host 75-85 us of a core a vector (NOTES 4o). Where
    OpenBLAS knows the CPU this changes little: on the CI machine's AMD EPYC it picks "Zen", as fast as
    "SkylakeX"."""
    source = os.environ if environ is None else environ
    if source.get(BLAS_KERNEL):
        return None
    if _AVX512 <= cpu_flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= cpu_flags:
        return "Haswell"
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux; empty elsewhere or when unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def choose_faiss_blas_kernel() -> str | None:
    """Set ``OPENBLAS_CORETYPE`` for this process (and the children it starts) where ``faiss_blas_kernel`` names
    one; returns it. Effective only before FAISS is first imported (``output`` calls it on import)."""
    kernel = faiss_blas_kernel(cpu_flags())
    if kernel is not None:
        os.environ[BLAS_KERNEL] = kernel
    return kernel
