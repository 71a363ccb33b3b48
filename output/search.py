"""`fbas-pipeline search`: embed queries with the job's own engine, search the FAISS index, map row ids to ids.

    s = Searcher("out/")                       # reads manifest.json, index.faiss, the model in out/.fbas/model
    s.search(["a question"], k=10)             # [[Hit(id, score, row_id), ...]]

Queries are embedded in-process with the model the manifest records (its fingerprint is
checked), so they get the same tokenizer, pooling, normalization and max_seq_len as the
corpus. Scores are inner products (cosine for normalized models).

In a chunked job (``ingest --chunk``) the index holds chunks. ``by="doc"`` (the default) returns documents,
each scored by its best chunk (the index is asked for more chunks until ``k`` documents are found, or it has no
more), with that chunk's spans; ``by="chunk"`` returns chunks, several of one document possibly, and
``with_text`` then shows each chunk's own text (its character span of the document's text). ``--queries FILE`` reads
Parquet or JSONL with ``id`` (or BEIR's ``_id``) and ``text`` and writes one JSON line per
query: ``{"query_id": ..., "hits": [{"id": ..., "score": ...}, ...]}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import CheckpointError, InputError
from core.jsonl import iter_jsonl
from core.layout import OutputDir
from output.ivf_index import tune

logger = logging.getLogger(__name__)

MAX_DOC_FETCH = 10_000  # search --by doc: rows asked of the index per query at most (4 * k when that is more)

__all__ = ["Searcher", "Hit", "read_queries"]


@dataclass(frozen=True)
class Hit:
    """One neighbour: the corpus id, its score (inner product), its row position and, once read back from the
    corpus (``Searcher.with_text``), its text and any other columns asked for."""

    id: Any
    score: float
    row_id: int  # the corpus row (the document's, in a chunked job)
    fields: dict[str, Any] = field(default_factory=dict)
    chunk: dict[str, int] | None = None  # chunked jobs: the (best) chunk: its index and spans (CHUNK_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        spans = {k: v for k, v in (self.chunk or {}).items() if k != "doc_row"}
        return {"id": self.id, "score": round(float(self.score), 6), **spans, **self.fields}


class Searcher:
    """An output folder opened for queries (see the module docstring)."""

    def __init__(self, out: str | Path, threads: int = 0) -> None:
        import faiss

        self.out = OutputDir(out)
        mpath = self.out.path("manifest.json")
        if not mpath.exists():
            raise InputError(
                f"{self.out} has no manifest.json: it is not a finished ingest (run or rerun "
                f"`fbas-pipeline ingest ... --out {self.out}`)"
            )
        self.manifest = json.loads(mpath.read_text(encoding="utf-8"))
        idx = self.manifest["index"]
        self.index = faiss.read_index(str(self.out.path(idx["file"])))
        params = idx.get("params", {})
        if idx["type"] == "ivfpq":
            tune(self.index, params)
        elif idx["type"] == "hnsw":
            # downcast_index returns the concrete class, which faiss's stubs can only type as Index
            idmap = cast(faiss.IndexIDMap, faiss.downcast_index(self.index))
            cast(faiss.IndexHNSW, faiss.downcast_index(idmap.index)).hnsw.efSearch = int(params.get("efSearch", 128))
        self.threads = threads
        self._engine: Any = None
        self._tokenizer: Any = None
        self._row_ids: np.ndarray | None = None
        self._ids: Any = None
        self._chunks: dict[str, np.ndarray] = {}
        self._corpus: Any = None
        self.chunked = "chunk" in (self.manifest.get("settings") or {})

    # -- the engine, loaded on first use
    def _load_engine(self) -> None:
        from engine.model_dir import load_engine, load_tokenizer, read_meta

        m = self.manifest["model"]
        model_dir = self.out.path(m["dir"])
        meta = read_meta(model_dir)
        if meta.fingerprint != m["fingerprint"]:
            raise CheckpointError(
                f"{model_dir} holds model {meta.fingerprint}, the index was built with "
                f"{m['fingerprint']}: the folder was changed; rerun the ingest"
            )
        self._engine = load_engine(model_dir, threads=self.threads)
        self._tokenizer = load_tokenizer(model_dir, meta)

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [n, dim]: the queries, embedded exactly as the corpus was."""
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InputError(f"query {i + 1} is empty: give a text to search for")
        if self._engine is None:
            self._load_engine()
        enc = self._tokenizer.encode(texts)
        return np.ascontiguousarray(self._engine.embed(enc.token_ids, enc.lengths), dtype=np.float32)

    # -- row id -> id
    def _load_ids(self) -> None:
        from core.formats import CHUNK_FIELDS

        extra = list(CHUNK_FIELDS) if self.chunked else []
        rows, ids, cols = [], [], []
        for p in self.manifest["parts"]:
            t = pq.read_table(self.out.path(p["file"]), columns=["row_id", "id", *extra])
            rows.append(t.column("row_id").to_numpy())
            ids.append(t.column("id").combine_chunks())
            cols.append([t.column(c).to_numpy() for c in extra])
        row_ids = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        order = np.argsort(row_ids, kind="stable")
        self._row_ids = row_ids[order]
        all_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.int64())
        self._ids = all_ids.take(pa.array(order))
        self._chunks = {c: np.concatenate([x[i] for x in cols])[order] for i, c in enumerate(extra)} if cols else {}

    def _positions(self, row_ids: np.ndarray) -> np.ndarray:
        if self._row_ids is None:
            self._load_ids()
        assert self._row_ids is not None, "_load_ids() sets it"
        pos = np.searchsorted(self._row_ids, row_ids)
        pos = np.clip(pos, 0, max(0, len(self._row_ids) - 1))
        if len(row_ids) and not np.array_equal(self._row_ids[pos], row_ids):
            raise CheckpointError("the index holds row ids that no vectors part has: rerun the ingest's finalize")
        return pos

    def ids_of(self, row_ids: np.ndarray) -> list:
        return self._ids.take(pa.array(self._positions(row_ids))).to_pylist()

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        """Hits for index rows (chunks, in a chunked job, with their spans and their document's row)."""
        keep = rows >= 0
        scores, rows = scores[keep], rows[keep]
        pos = self._positions(rows)
        ids = self._ids.take(pa.array(pos)).to_pylist()
        if not self.chunked:
            return [Hit(i, float(s), int(r)) for i, s, r in zip(ids, scores, rows)]
        cols = {c: a[pos].tolist() for c, a in self._chunks.items()}
        return [
            Hit(i, float(s), int(cols["doc_row"][j]), chunk={c: v[j] for c, v in cols.items()})
            for j, (i, s) in enumerate(zip(ids, scores))
        ]

    def search_vectors(self, vectors: np.ndarray, k: int, by: str = "doc") -> list[list[Hit]]:
        """The ``k`` nearest rows (``by="chunk"``, or any job that is not chunked) or documents (``by="doc"``:
        each scored by its best chunk) for each vector, best first."""
        if k < 1:
            raise InputError(f"-k {k}: ask for at least one neighbour")
        if by not in ("doc", "chunk"):
            raise InputError(f"--by {by!r}: give doc (documents by their best chunk) or chunk")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self.chunked or by == "chunk":
            scores, rows = self.index.search(vectors, k)
            return [self._hits(s, r) for s, r in zip(scores, rows)]
        out: list[list[Hit] | None] = [None] * len(vectors)
        # k documents are among any k * (most chunks of a document) rows; past MAX_DOC_FETCH (k > the documents,
        # or a few documents with many near chunks) what was found is returned rather than the whole index
        bound = min(self.index.ntotal, k * self._max_chunks(), max(MAX_DOC_FETCH, 4 * k))
        todo, fetch = np.arange(len(vectors)), min(bound, 4 * k)
        while len(todo):
            scores, rows = self.index.search(vectors[todo], max(1, fetch))
            left = []
            for q, s, r in zip(todo.tolist(), scores, rows):
                docs = _best_per_doc(self._hits(s, r), k)
                if len(docs) >= k or fetch >= bound:
                    out[q] = docs
                else:
                    left.append(q)
            todo, fetch = np.asarray(left, dtype=np.int64), min(bound, 4 * fetch)
        return [hs or [] for hs in out]

    def _max_chunks(self) -> int:
        """The most chunks any document has (1 when none is indexed)."""
        if self._row_ids is None:
            self._load_ids()
        chunk = self._chunks.get("chunk")
        return int(chunk.max()) + 1 if chunk is not None and len(chunk) else 1

    def search(self, texts: list[str], k: int = 10, by: str = "doc") -> list[list[Hit]]:
        """The ``k`` nearest corpus rows for each text, best first (documents or chunks: ``search_vectors``)."""
        return self.search_vectors(self.embed(texts), k, by)

    def with_text(self, hits: list[list[Hit]], columns: list[str] | None = None, by: str = "doc") -> list[list[Hit]]:
        """The hits with their text (and ``columns``) read back from the corpus; unchanged, with one warning,
        when the corpus is no longer what the job read. ``by="chunk"``: a chunk hit's text is its own span."""
        from output.corpus_text import CorpusText

        if self._corpus is None:
            self._corpus = CorpusText(self.manifest["corpus"])
            if self._corpus.problem:
                logger.warning("hits show ids only: %s", self._corpus.problem)
        if self._corpus.problem:
            return hits
        flat = [h for hs in hits for h in hs]
        rows = iter(self._corpus.rows([h.row_id for h in flat], columns))

        def fields(h: Hit) -> dict[str, Any]:
            f = next(rows)
            if by == "chunk" and h.chunk is not None and isinstance(f.get("text"), str):
                f["text"] = f["text"][h.chunk["char_start"] : h.chunk["char_end"]]
            return f

        return [[replace(h, fields=fields(h)) for h in hs] for hs in hits]


def _best_per_doc(hits: list[Hit], k: int) -> list[Hit]:
    """The first (best) hit of each document, at most ``k`` of them, in the order given (best first)."""
    seen: set[int] = set()
    out = []
    for h in hits:
        if h.row_id not in seen:
            seen.add(h.row_id)
            out.append(h)
            if len(out) == k:
                break
    return out


def read_queries(path: str | Path) -> list[tuple[Any, str]]:
    """(query id, text) from Parquet or JSONL with ``id``/``_id`` and ``text``."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"queries file {p} does not exist")
    rows: list[tuple[Any, str]] = []
    if p.suffix.lower() in (".parquet", ".pq"):
        t = pq.read_table(p)
        idc = "id" if "id" in t.column_names else "_id" if "_id" in t.column_names else None
        if idc is None or "text" not in t.column_names:
            raise InputError(f"{p} needs columns 'id' (or '_id') and 'text' (has {', '.join(t.column_names)})")
        rows = list(zip(t.column(idc).to_pylist(), t.column("text").to_pylist()))
    else:
        for n, obj in iter_jsonl(p):
            qid = obj.get("id", obj.get("_id")) if isinstance(obj, dict) else None
            if qid is None or not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InputError(f"{p}:{n}: each line needs 'id' (or '_id') and a string 'text'")
            rows.append((qid, obj["text"]))
    for qid, text in rows:
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{p}: query {qid!r} has an empty text")
    return rows


def search_many(
    searcher: Searcher, queries: list[tuple[Any, str]], k: int, chunk: int = 256, by: str = "doc"
) -> Iterator[tuple[Any, list[Hit]]]:
    """(query id, hits) per query, embedding ``chunk`` queries per engine call."""
    for start in range(0, len(queries), chunk):
        part = queries[start : start + chunk]
        hits = searcher.search([t for _, t in part], k, by)
        yield from zip((q for q, _ in part), hits)
