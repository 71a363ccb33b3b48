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
