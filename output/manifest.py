"""The job record finalize reads (``.fbas/job.json``) and the manifest it writes last (``manifest.json``)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from core.errors import InputError
from core.layout import JOB_FILE, MANIFEST, OutputDir

__all__ = ["load_job", "sha256_file", "write_manifest"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_job(out: OutputDir) -> dict[str, Any]:
    p = out.state(JOB_FILE)
    if not p.exists():
        raise InputError(f"{out} holds no fbas job (no .fbas/{JOB_FILE}): run `fbas-pipeline ingest ... --out {out}`")
    return json.loads(p.read_text(encoding="utf-8"))


def write_manifest(
    out: OutputDir,
    job: dict[str, Any],
    *,
    counts: dict[str, Any],
    index: dict[str, Any],
    parts: list[dict[str, Any]],
    quarantine: dict[str, Any] | None,
    timings: dict[str, Any],
) -> dict[str, Any]:
    """Write ``OUT/manifest.json`` (atomically, last of the job's files) and return it: the job's model, corpus
    and settings from ``job.json``, the counts, the index and every file's SHA-256. The oracle's counts are
    zero: finalize writes no manifest when they are not."""
    manifest = {
        "format": 1,
        "job": job["job"],
        "model": job["model"],
        "corpus": job["corpus"],
        "settings": job.get("settings", {}),
        "counts": counts,
        "oracle": {"lost": 0, "duplicated": 0, "unexpected": 0},
        "index": index,
        "parts": parts,
        "quarantine": quarantine,
        "timings": timings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if "generations" in job:  # ``ingest --update``: what each generation kept, added, changed and removed
        manifest["generations"] = job["generations"]
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    OutputDir.write_atomic(out.path(MANIFEST), lambda p: p.write_bytes(data))
    return manifest
