"""Checks of a job's committed parts: which batches are committed, which files do not belong, and the
oracle's count (every input row seen exactly once, with its own id).

Terms (``docs/reliability.md``): E = input rows, C = rows in the committed vectors parts, Q = quarantined
rows. Every row must be counted exactly once in C + Q (``lost`` = none, ``duplicated`` = more than one),
every committed id must equal the input's id at that row (``unexpected`` otherwise).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from core.errors import PermanentError
from core.layout import PART_RE, VECTORS, OutputDir, read_part_meta
from core.rowfile import release

__all__ = ["committed_parts", "check_folder", "tally", "stat_key", "IncompleteJobError", "OracleError"]


class IncompleteJobError(PermanentError):
    """Planned batches have no committed part yet (rerun the ingest to finish them)."""

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing


class OracleError(PermanentError):
    """Rows are lost, duplicated or unexpected: the output is not trustworthy (a bug; please report it)."""


def committed_parts(out: OutputDir, job: str, n_batches: int | None) -> dict[int, tuple[int, int, int]]:
    """``{batch: (docs, tokens, quarantined)}`` for this job's committed vectors parts (others are skipped);
    ``n_batches`` None: every batch index counts (the plan is not complete yet)."""
    found: dict[int, tuple[int, int, int]] = {}
    d = out.path(VECTORS)
    if not d.is_dir():
        return found
    for name in os.listdir(d):
        m = PART_RE.match(name)
        if not m or (n_batches is not None and int(m.group(1)) >= n_batches):
            continue
        meta = read_part_meta(d / name)
        b = int(m.group(1))
        if meta and meta.get("job") == job and meta.get("batch") == b:
            found[b] = (int(meta["rows"]), int(meta["tokens"]), int(meta["quarantined"]))
    return found


def check_folder(
    out: OutputDir, job: str, n_batches: int, known: dict[int, tuple[int, ...]] | None = None
) -> tuple[list[int], list[str]]:
    """(missing batches, stray files) in vectors/; temp files whose writer is provably gone are removed, live
    ones (a late duplicate delivery still writing) are left to their writer. ``known``: parts whose
    footer was read already, by file key (``stat_key``): unchanged, they are not opened again."""
    d = out.path(VECTORS)
    present: set[int] = set()
    stray: list[str] = []
    for name in sorted(os.listdir(d)) if d.is_dir() else []:
        if ".tmp-" in name:
            if OutputDir.stale_temp(d / name):
                (d / name).unlink(missing_ok=True)
            continue
        m = PART_RE.match(name)
        if not m or int(m.group(1)) >= n_batches:
            stray.append(f"{VECTORS}/{name}")
            continue
        b = int(m.group(1))
        if known and b in known and stat_key(d / name) == known[b]:
            present.add(b)
            continue
        meta = read_part_meta(d / name)
        if not meta or meta.get("job") != job or meta.get("batch") != b:
            stray.append(f"{VECTORS}/{name} (from job {meta.get('job') if meta else 'unknown'})")
            continue
        present.add(b)
    return [b for b in range(n_batches) if b not in present], stray


def tally(
    counts: np.ndarray,
    rows: np.ndarray,
    id_hash: np.ndarray,
    corpus_hash: np.ndarray,
    where: str,
    unexpected: list[str],
) -> None:
    """Count each row once more in ``counts``; note rows out of range and ids (by key) that differ from the
    corpus's (``corpus_hash``: every input row's id key)."""
    n = len(counts)
    bad = (rows < 0) | (rows >= n)
    if bad.any():
        unexpected.append(f"{where}: row ids out of range {rows[bad][:3].tolist()}")
        rows, id_hash = rows[~bad], id_hash[~bad]
    mism = id_hash != corpus_hash[rows]
    if mism.any():
        unexpected.append(f"{where}: ids differ from the corpus at rows {rows[mism][:3].tolist()}")
    np.add.at(counts, rows, 1)
    if len(rows):  # per-row arrays mapped from files (``core.rowfile``): the pages just used go back
        lo, hi = int(rows.min()), int(rows.max()) + 1
        release(corpus_hash[lo:hi])
        release(counts[lo:hi])


def stat_key(path: Path) -> tuple[int, ...] | None:
    """(inode, size, mtime, ctime) of a committed file: a part is written once under a new inode (rename or
    link), so an unchanged key means unchanged bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
