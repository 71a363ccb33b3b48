"""`fbas-pipeline ingest --update`: bring an output folder up to date with a corpus that grew or changed.

    result = update("corpus.parquet", cfg)    # cfg.output.update; local mode when cfg.queue.broker is None

Each row is known by its id's key and a hash of its text as embedded (title included): ``OUT/.fbas/content.npz``
holds both for the generation in OUT. An update compares the corpus with it:

    kept      the id is there with the same text hash and a vector (and, chunked, no quarantined chunk): the
              vector is copied, not embedded
    added     a new id: embedded
    changed   the same id with another text, or one that was quarantined before: embedded again
    removed   an id of the old generation that the corpus lacks (``--keep-missing`` keeps its vector, after
              the corpus's rows)

The rows to embed are written to ``OUT/.fbas/update/delta.parquet`` and ingested into ``OUT/.fbas/update/embed``
by an ordinary job (the same machinery, resumable). The new generation is then written as a job of its own:
its parts hold every row in corpus order (row ids = corpus positions, as a fresh ingest has them), and
finalize checks it with the same oracle, rebuilds the index from the parts and writes the manifest, which lists
every generation (``generations``: kept, added, changed, removed).

Everything that can fail on the new corpus (its path, duplicate ids, the model, the index kind, the delta's
ingest) runs while OUT still holds the old generation untouched. Only then is the old one moved to
``OUT/.fbas/prev/`` (the manifest first, ``prev/moved`` last: a move cut short is finished by the next run) and
the new one written; ``prev/`` is renamed to a tombstone and deleted once the new manifest and ``content.npz``
are written. An update killed at any point and run again finds ``prev/``, takes the old generation from there,
clears what the killed run wrote and does it again: the same result. The new generation keeps the folder's
index kind unless another than the default (flat) is given; the delta's own ingest is always flat.

In a chunked job (``--chunk``, which must be the folder's) the same holds per document: a kept document keeps
all its chunks, a new or changed one is chunked and embedded by the rows' ingest, and the new generation numbers
its chunks in corpus order, as a fresh chunked ingest does. An OUT made by a plain ingest (no ``content.npz``)
knows no text hashes: every row is embedded again once. An OUT without a finished job gets a full ingest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.chunking import ChunkSpec
from core.config import FbasConfig, OutputConfig, fingerprint
from core.errors import ConfigError, InputError
from core.formats import CHUNK_FIELDS, ChunkCols, Plan, Scan
from core.ids import id_hashes
from core.layout import (
    CONTENT_FILE,
    GENERATIONS_FILE,
    INDEX_FILE,
    JOB_FILE,
    MANIFEST,
    MODEL_SUBDIR,
    PENDING_FILE,
    PLAN_FILE,
    PREV_SUBDIR,
    QUARANTINE,
    QUARANTINE_FILE,
    ROW_FILES,
    SCAN_FILE,
    SCAN_QUARANTINE,
    STATE,
    UPDATE_SUBDIR,
    VECTORS,
    OutputDir,
    vectors_schema,
)
from output.finalize import finalize
from output.index import check_index_kind
from output.ledger import part_vectors
from pipeline.ingest.job import IngestResult, JobContext, save_job
from pipeline.ingest.plan import check_unique_ids, corpus_id_hashes
from pipeline.ingest.read import Corpus, open_corpus
from workers.write import BatchOutput, write_batch

logger = logging.getLogger(__name__)

__all__ = ["update", "content_hashes", "PART_ROWS"]

PART_ROWS = 65_536  # rows per part of an updated generation
_KEPT = ["id", "embedding", "n_tokens", "truncated", "repaired"]  # a part's columns an update carries over
# a generation's files, in the order they move to prev/ (the manifest first: prev/ then holds the truth)
_GENERATION = (MANIFEST, INDEX_FILE, QUARANTINE_FILE, VECTORS)
_GENERATION_STATE = (CONTENT_FILE, GENERATIONS_FILE, JOB_FILE, SCAN_FILE, *ROW_FILES, PLAN_FILE, SCAN_QUARANTINE)
_REBUILT = (QUARANTINE, f"{STATE}/{PENDING_FILE}")  # state of the generation's job, made again
_MOVED = "moved"  # in prev/, written once the whole old generation is there
_TOMBSTONE = ".deleting"  # prev/ and update/ are renamed to this name, then deleted


def content_hashes(corpus: Corpus) -> np.ndarray:
    """uint64 [n_rows]: a 64-bit BLAKE2b of each row's text as embedded (title + " " + text with a title column;
    0 for a null text)."""
    h = np.zeros(corpus.n_rows, dtype=np.uint64)
    for rb in corpus.batches():
        h[rb.row0 : rb.row0 + len(rb)] = [0 if t is None else _hash(t) for t in rb.texts]
    return h


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


@dataclass
class _Old:
    """The generation an update replaces: its manifest, each document with vectors (by id key: its text hash, its
    rows in ``table``) and the rows' stored columns."""

    manifest: dict
    keys: np.ndarray  # uint64 [D]: id keys of its documents that have vectors, sorted
    first: np.ndarray  # int64 [D]: each one's first row in ``table``
    count: np.ndarray  # int64 [D]: its rows (chunks; 1 without chunking)
    hashes: np.ndarray  # uint64 [D]: their text hashes (0 where unknown)
    doc_rows: np.ndarray  # int64 [D]: their document rows in it
    all_keys: np.ndarray  # uint64: id keys of all its documents, quarantined ones included
    q_keys: np.ndarray  # uint64: id keys of its documents with a quarantined row (chunk)
    table: pa.Table  # _KEPT (+ CHUNK_FIELDS) of its rows, by key then chunk
    generations: list[dict]
    chunk: str | None  # its chunking (the manifest's ``settings.chunk``)


def update(
    corpus_uri: str,
    cfg: FbasConfig,
    ingest: Callable[..., IngestResult],
    *,
    progress: bool | None = None,
    model_dir: str | Path | None = None,
) -> IngestResult:
    """Run (or finish) an update of ``cfg.output.out`` to ``corpus_uri`` (see the module docstring); ``ingest``:
    ``pipeline.ingest.run.ingest``, which embeds the rows (``run`` calls this module, not the other way)."""
    out = OutputDir(cfg.output.out)
    plain = replace(cfg, output=replace(cfg.output, update=False, keep_missing=False))
    spec = ChunkSpec.parse(cfg.corpus.chunk)
    prev = out.path(f"{STATE}/{PREV_SUBDIR}")
    if not (out.path(MANIFEST).exists() or (prev / MANIFEST).exists()):  # nothing finished yet: a full ingest
        r = ingest(corpus_uri, plain, progress=progress, model_dir=model_dir)
        corpus = open_corpus(corpus_uri, cfg.corpus)
        with out.lock():
            _write_content(out, corpus_id_hashes(corpus), content_hashes(corpus))
            gen = {"generation": 1, "created": _now(), "corpus": corpus.uri, "rows": corpus.n_rows, "added": None}
            _write_json(out.state(GENERATIONS_FILE), [gen])
        return r
    t0 = time.perf_counter()
    with out.lock():
        staging = out.path(f"{STATE}/{UPDATE_SUBDIR}")
        _sweep_tombstones(out)
        if prev.exists() and not (prev / _MOVED).exists():  # a move cut short: OUT no longer holds the old whole
            _move_to_prev(out, prev)
        src = prev if (prev / _MOVED).exists() else out.root  # where the old generation is, whole
        current = json.loads((src / MANIFEST).read_text("utf-8"))
        had = (current.get("settings") or {}).get("chunk")
        if had != (spec.label() if spec else None):
            raise ConfigError(
                f"{out} was ingested with --chunk {had or '(none)'}, this update asks for "
                f"{spec.label() if spec else '(none)'}: give the folder's chunking, or ingest into another --out"
            )
        # everything that can fail on the new corpus fails here, before the old generation leaves OUT
        corpus = open_corpus(corpus_uri, cfg.corpus)
        keys = corpus_id_hashes(corpus)
        check_unique_ids(corpus, keys)
        _check_model(plain, current["model"], OutputDir(staging / "embed"), model_dir, out)
        old = _read_old(src)
        index = _index_kind(cfg, current)
        hashes = content_hashes(corpus)
        pos = np.clip(np.searchsorted(old.keys, keys), 0, max(0, len(old.keys) - 1)).astype(np.int64)
        has = (old.keys[pos] == keys) if len(old.keys) else np.zeros(len(keys), dtype=bool)
        kept = has & (hashes != 0)
        if len(old.keys):  # an old generation without a vector (all its rows blank) keeps nothing
            kept &= old.hashes[pos] == hashes
        kept &= ~np.isin(keys, old.q_keys)  # a document with a quarantined chunk is done again, all its chunks
        known = has | np.isin(keys, old.all_keys)  # quarantined rows of the old generation are known too
        delta_rows = np.flatnonzero(~kept)
        missing = _missing(old, keys) if cfg.output.keep_missing else np.zeros(0, np.int64)
        check_index_kind(index, corpus.n_rows + len(missing))
        delta_text = hashlib.blake2b(delta_rows.astype(np.int64).tobytes(), digest_size=16)
        delta_text.update(hashes[delta_rows].tobytes())  # an in-place edit of a delta row is another delta
        key = fingerprint({"corpus": corpus.fingerprint, "old": old.manifest["job"], "delta": delta_text.hexdigest()})
        if (staging / "key").exists() and (staging / "key").read_text(encoding="utf-8") != key:
            shutil.rmtree(staging)  # a killed update towards another corpus: its rows are not these
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "key").write_text(key, encoding="utf-8")
        embedded = _embed_delta(corpus, delta_rows, staging, plain, old, ingest, progress, model_dir)
        generation = int(old.generations[-1]["generation"]) + 1 if old.generations else 2
        changes = {
            "generation": generation,
            "created": _now(),
            "corpus": corpus.uri,
            "rows": corpus.n_rows,
            "kept": int(kept.sum()),
            "added": int((~known).sum()),
            "changed": int((known & ~kept).sum()),
            "removed": int(len(old.all_keys) - known.sum() - len(missing)),
            "kept_missing": len(missing),
        }
        _move_to_prev(out, prev)
        _clear_generation(out)
        manifest = _write_generation(out, cfg, corpus, keys, kept, pos, old, embedded, missing, changes, index)
        all_keys = np.concatenate([keys, old.keys[missing]])
        all_hashes = np.concatenate([hashes, old.hashes[missing]])
        _write_content(out, all_keys, all_hashes)
        _write_json(out.state(GENERATIONS_FILE), [*old.generations, changes])
        _discard(prev)  # the new generation is final
        _discard(staging)
    logger.info("update %s: %s", out, json.dumps(changes))
    return IngestResult(out.root, manifest["job"], manifest, time.perf_counter() - t0, 0, embedded.sent, embedded.done)


def _index_kind(cfg: FbasConfig, current: dict) -> str:
    """The new generation's index: the folder's, unless another kind than the default (flat) is asked for."""
    default = OutputConfig().index
    return cfg.output.index if cfg.output.index != default else str(current["index"]["type"])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json(path: Path, obj: Any) -> None:
    OutputDir.write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8"))


def _write_content(out: OutputDir, keys: np.ndarray, hashes: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, keys=keys.astype(np.uint64), hashes=hashes.astype(np.uint64))

    OutputDir.write_atomic(out.state(CONTENT_FILE), write)


def _move_to_prev(out: OutputDir, prev: Path) -> None:
    """Move the generation in OUT to ``prev`` (the manifest first), then write ``prev/moved``. Each run moves what
    is left (a name already in ``prev`` stays there: only the new generation's files can then be in OUT), so a
    move cut short is finished by the next run; once ``moved`` exists, what OUT holds is a killed update's
    unfinished work, cleared and done again."""
    if (prev / _MOVED).exists():
        logger.warning("%s holds an unfinished update: the generation before it is taken from %s", out, prev)
        return
    (prev / STATE).mkdir(parents=True, exist_ok=True)
    for src, dst in [
        *((out.path(n), prev / n) for n in _GENERATION),
        *((out.state(n), prev / STATE / n) for n in _GENERATION_STATE),
    ]:
        if src.exists() and not dst.exists():
            _rename(src, dst)
    (prev / _MOVED).write_bytes(b"")


def _rename(src: Path, dst: Path) -> None:
    src.rename(dst)


def _discard(path: Path) -> None:
    """Delete a folder at once for a later run: renamed to a tombstone first (atomic), then removed."""
    if not path.exists():
        return
    tomb = path.with_name(path.name + _TOMBSTONE)
    if tomb.exists():
        shutil.rmtree(tomb)
    path.rename(tomb)
    shutil.rmtree(tomb)


def _sweep_tombstones(out: OutputDir) -> None:
    """Finish deleting what a killed update had renamed to a tombstone."""
    for name in (PREV_SUBDIR, UPDATE_SUBDIR):
        tomb = out.path(f"{STATE}/{name}{_TOMBSTONE}")
        if tomb.exists():
            shutil.rmtree(tomb)


def _clear_generation(out: OutputDir) -> None:
    """Remove the files of the generation being written (what a killed update left) before writing it again."""
    for name in _GENERATION:
        p = out.path(name)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    for name in (*(f"{STATE}/{n}" for n in _GENERATION_STATE), *_REBUILT):
        p = out.path(name)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _read_old(prev: Path) -> _Old:
    """The replaced generation from ``prev`` (``OUT/.fbas/prev``, or OUT itself before the move): its manifest,
    and its embedded rows grouped by document."""
    manifest = json.loads((prev / MANIFEST).read_text(encoding="utf-8"))
    chunk = (manifest.get("settings") or {}).get("chunk")
    cols = ["row_id", *_KEPT, *(CHUNK_FIELDS if chunk else ())]
    tables = [pq.read_table(prev / VECTORS / Path(p["file"]).name, columns=cols) for p in manifest["parts"]]
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables]) if tables else None
    if table is None or not table.num_rows:
        dim = int(manifest["model"]["dim"])
        id_type = pa.int64() if manifest["corpus"]["id_type"] == "int64" else pa.string()
        schema = vectors_schema(dim, "int64" if id_type == pa.int64() else "string", chunked=bool(chunk))
        table = schema.empty_table().select(cols)
    row_keys = id_hashes(table.column("id"))
    chunk_ix = table.column("chunk").to_numpy() if chunk else np.zeros(len(row_keys), np.int32)
    order = np.lexsort((chunk_ix, row_keys))
    table = table.take(pa.array(order))
    keys, first, count = np.unique(row_keys[order], return_index=True, return_counts=True)
    doc_rows = table.column("doc_row" if chunk else "row_id").to_numpy()[first]
    table = table.drop(["row_id"])
    hashes = np.zeros(len(keys), dtype=np.uint64)
    content = prev / STATE / CONTENT_FILE
    all_keys = keys
    if content.exists():
        with np.load(content) as z:
            ck, ch = z["keys"], z["hashes"]
        all_keys = np.union1d(ck, keys)
        if len(ck):
            o = np.argsort(ck, kind="stable")
            ck, ch = ck[o], ch[o]
            at = np.clip(np.searchsorted(ck, keys), 0, len(ck) - 1)
            hashes = np.where(ck[at] == keys, ch[at], 0).astype(np.uint64)
    else:
        logger.warning(
            "%s was made by an ingest without --update, which keeps no text hashes: every row is embedded again "
            "this once",
            prev,
        )
    qf = prev / QUARANTINE_FILE
    q_keys = id_hashes(pq.read_table(qf, columns=["id"]).column("id")) if qf.exists() else np.zeros(0, np.uint64)
    gens_path = prev / STATE / GENERATIONS_FILE
    gens = json.loads(gens_path.read_text(encoding="utf-8")) if gens_path.exists() else []
    return _Old(
        manifest,
        keys,
        first.astype(np.int64),
        count.astype(np.int64),
        hashes,
        doc_rows,
        all_keys,
        np.unique(q_keys),
        table,
        gens,
        chunk,
    )


def _missing(old: _Old, keys: np.ndarray) -> np.ndarray:
    """Positions in ``old.keys`` of documents the corpus lacks, in their old row order."""
    gone = np.flatnonzero(~np.isin(old.keys, keys))
    return gone[np.argsort(old.doc_rows[gone], kind="stable")]


@dataclass
class _Embedded:
    """The delta's ingest: its embedded rows (in row order: by document, then chunk), each one's document (a
    delta position), and its quarantined rows' documents and reasons."""

    table: pa.Table  # _KEPT (+ CHUNK_FIELDS)
    docs: np.ndarray  # int64 [len(table)]: delta position of each row's document
    q_docs: np.ndarray  # int64: delta position of each quarantined row's document
    q_reasons: list[str]
    sent: int
    done: int


def _embed_delta(
    corpus: Corpus,
    rows: np.ndarray,
    staging: Path,
    cfg: FbasConfig,
    old: _Old,
    ingest: Callable[..., IngestResult],
    progress: bool | None,
    model_dir: str | Path | None,
) -> _Embedded:
    """Write the documents to embed to ``staging/delta.parquet`` and ingest it into ``staging/embed`` (an ordinary
    job, chunked as the folder is: a rerun resumes it)."""
    embed_out = OutputDir(staging / "embed")
    if not len(rows):
        return _Embedded(old.table.slice(0, 0), np.zeros(0, np.int64), np.zeros(0, np.int64), [], 0, 0)
    delta = staging / "delta.parquet"
    if not delta.exists():
        _write_delta(corpus, rows, delta)
    sub_cfg = replace(
        cfg,
        output=replace(cfg.output, out=str(embed_out), index="flat"),  # its own index is never searched
        corpus=replace(
            cfg.corpus, id_column="id", text_column="text", title_column="title" if corpus.title_column else None
        ),
    )
    r = ingest(str(delta), sub_cfg, progress=progress, model_dir=model_dir)
    cols = ["row_id", *old.table.column_names]
    parts = [
        pq.read_table(embed_out.path(p["file"]), columns=cols).replace_schema_metadata(None)
        for p in r.manifest["parts"]
    ]
    table = old.table.slice(0, 0)
    units = docs = np.zeros(0, np.int64)
    if parts:
        t = pa.concat_tables(parts)
        t = t.take(pa.array(np.argsort(t.column("row_id").to_numpy(), kind="stable")))
        units, table = t.column("row_id").to_numpy(), t.drop(["row_id"])
        docs = table.column("doc_row").to_numpy() if old.chunk else units
    q_docs, q_reasons = np.zeros(0, np.int64), []
    qf = embed_out.path(QUARANTINE_FILE)
    if qf.exists():
        q = pq.read_table(qf)
        q_docs, q_reasons = q.column("row_id").to_numpy().astype(np.int64), q.column("reason").to_pylist()
        if old.chunk:  # a chunked job's quarantine names chunk rows: their documents are in its scan
            q_docs = Scan.load(embed_out.state(SCAN_FILE)).doc_row[q_docs]  # type: ignore[index]
    return _Embedded(table, docs.astype(np.int64), q_docs.astype(np.int64), q_reasons, r.sent_batches, r.docs_this_run)


def _check_model(
    cfg: FbasConfig, want: dict, embed_out: OutputDir, model_dir: str | Path | None, out: OutputDir
) -> None:
    """Refuse an update whose model (built into the staging folder, or taken from the build cache) is not the one
    that made the folder's vectors, before anything in the folder is touched."""
    from engine.model_dir import read_meta
    from pipeline.ingest.model_cache import ensure_model

    meta = read_meta(ensure_model(cfg, embed_out, built=Path(model_dir) if model_dir else None))
    if meta.fingerprint != want["fingerprint"]:
        raise InputError(
            f"{out} holds vectors of model {want.get('name')} ({want['fingerprint']}, {want.get('precision')}, "
            f"max_seq_len {want.get('max_seq_len')}); this --update would embed with {meta.name} "
            f"({meta.fingerprint}, {meta.precision}, max_seq_len {meta.max_seq_len}): give the same model settings "
            "as the folder's first ingest, or write the new model's vectors to another --out"
        )


def _write_delta(corpus: Corpus, rows: np.ndarray, path: Path) -> None:
    """The corpus's ``rows`` (ascending) as a Parquet file: id, text and title as the corpus has them."""
    ids: list = []
    texts: list = []
    titles: list = []
    for rb in corpus.batches(split_title=True):
        lo, hi = np.searchsorted(rows, [rb.row0, rb.row0 + len(rb)])
        for r in rows[lo:hi].tolist():
            i = r - rb.row0
            ids.append(rb.ids[i])
            texts.append(rb.texts[i])
            if rb.titles is not None:
                titles.append(rb.titles[i])
    columns: dict[str, pa.Array] = {
        "id": pa.array(ids, pa.int64() if corpus.id_type == "int64" else pa.string()),
        "text": pa.array(texts, pa.string()),
    }
    if corpus.title_column:
        columns["title"] = pa.array(titles, pa.string())
    OutputDir.write_atomic(path, lambda p: pq.write_table(pa.table(columns), p))


def _write_generation(
    out: OutputDir,
    cfg: FbasConfig,
    corpus: Corpus,
    keys: np.ndarray,
    kept: np.ndarray,
    pos: np.ndarray,
    old: _Old,
    embedded: _Embedded,
    missing: np.ndarray,
    changes: dict,
    index: str,
) -> dict:
    """Write the new generation as a job of its own (its rows in corpus order: each document's chunks, or the one
    row that quarantines it; then ``missing`` documents), its scan, plan and job.json, and finalize it."""
    from engine.model_dir import read_meta

    n, m = corpus.n_rows, len(missing)
    delta_rows = np.flatnonzero(~kept)  # corpus row of each delta position
    n_delta = len(delta_rows)
    emb_count = np.bincount(embedded.docs, minlength=n_delta).astype(np.int64)
    emb_first = np.concatenate([[0], np.cumsum(emb_count)[:-1]]).astype(np.int64)
    q_order = np.argsort(embedded.q_docs, kind="stable")
    q_docs = embedded.q_docs[q_order]
    q_count = np.bincount(q_docs, minlength=n_delta).astype(np.int64)
    q_first = np.concatenate([[0], np.cumsum(q_count)[:-1]]).astype(np.int64)
    # per document of the new generation: where its rows come from
    doc_first = np.zeros(n + m, np.int64)  # first row in the combined table (old rows, then the delta's)
    doc_emb = np.zeros(n + m, np.int64)  # rows with vectors
    doc_q = np.zeros(n + m, np.int64)  # quarantined rows (after them)
    doc_qfirst = np.zeros(n + m, np.int64)
    k = np.flatnonzero(kept)
    doc_first[k], doc_emb[k] = old.first[pos[k]], old.count[pos[k]]
    doc_first[n:], doc_emb[n:] = old.first[missing], old.count[missing]
    doc_first[delta_rows] = len(old.table) + emb_first
    doc_emb[delta_rows], doc_q[delta_rows], doc_qfirst[delta_rows] = emb_count, q_count, q_first
    per_doc = doc_emb + doc_q
    unit_doc = np.repeat(np.arange(n + m, dtype=np.int64), per_doc)
    offset = np.arange(len(unit_doc), dtype=np.int64) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    has_vec = offset < doc_emb[unit_doc]
    rows = np.flatnonzero(has_vec)  # the new generation's embedded rows
    src = doc_first[unit_doc[rows]] + offset[rows]
    table = pa.concat_tables([old.table, embedded.table.cast(old.table.schema)])
    t = table.take(pa.array(src))
    q_units = np.flatnonzero(~has_vec)
    q_pick = q_order[doc_qfirst[unit_doc[q_units]] + offset[q_units] - doc_emb[unit_doc[q_units]]]
    q_reasons = [embedded.q_reasons[int(i)] for i in q_pick]
    meta = read_meta(out.state(MODEL_SUBDIR))
    ctx = JobContext(corpus, cfg, out, meta, generation=int(changes["generation"]))
    n_tokens = np.zeros(len(unit_doc), dtype=np.int32)
    n_tokens[rows] = t.column("n_tokens").to_numpy()
    chunks = None
    if old.chunk:
        chunks = ChunkCols(unit_doc[rows], *(t.column(c).to_numpy() for c in CHUNK_FIELDS[1:]))
    offsets = np.unique(np.r_[np.arange(0, len(rows), PART_ROWS), len(rows)]).astype(np.int64)
    vecs = part_vectors(t)
    ids = t.column("id").to_pylist()
    truncated = t.column("truncated").to_numpy(zero_copy_only=False)
    repaired = t.column("repaired").to_numpy(zero_copy_only=False)
    for b in range(len(offsets) - 1):
        a, z = int(offsets[b]), int(offsets[b + 1])
        part = BatchOutput(
            ctx.job_id,
            b,
            meta.fingerprint,
            meta.dim,
            corpus.id_type,
            rows[a:z],
            ids[a:z],
            np.ascontiguousarray(vecs[a:z]),
            n_tokens[rows[a:z]],
            truncated[a:z],
            repaired[a:z],
            np.zeros(0, np.int64),
            [],
            [],
            chunks.take(np.arange(a, z)) if chunks is not None else None,
        )
        write_batch(out, part)
    bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))
    plan = Plan(
        rows.astype(np.int64),
        offsets,
        np.asarray([int(n_tokens[rows[a:z]].max(initial=0)) for a, z in bounds], np.int32),
        np.asarray([int(n_tokens[rows[a:z]].sum()) for a, z in bounds], np.int64),
    )
    doc_keys = np.concatenate([keys, old.keys[missing]])
    scan = Scan(
        len(unit_doc),
        n_tokens,
        doc_keys[unit_doc],
        q_units.astype(np.int64),
        _corpus_ids(corpus, unit_doc[q_units].tolist()),
        q_reasons,
        int(truncated.sum()),
        int(repaired.sum()),
    )
    if old.chunk:
        scan.doc_row, scan.n_docs = unit_doc, n + m
    save_job(ctx, scan, plan, extra={"generations": [*old.generations, changes]})
    return finalize(out, index)


def _corpus_ids(corpus: Corpus, rows: list[int]) -> list:
    """The corpus's ids at ``rows`` (ascending)."""
    if not rows:
        return []
    want = np.asarray(rows, dtype=np.int64)
    got: list = []
    for rb in corpus.batches():
        lo, hi = np.searchsorted(want, [rb.row0, rb.row0 + len(rb)])
        got.extend(rb.ids[int(r) - rb.row0] for r in want[lo:hi].tolist())
    return got
