"""`fbas-pipeline embed`: texts from a file -> float32 .npy in input order, in-process."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from core.config import RuntimeConfig
from core.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["read_texts", "embed_file", "embed_texts"]


def read_texts(path: str | Path, text_column: str = "text") -> list[str]:
    """Texts from .txt (one per line), .parquet or .jsonl; refuses empty or non-text rows by position."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"input {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(p)
        if text_column not in schema.names:
            raise InputError(
                f"{p} has no column {text_column!r} (columns: {', '.join(schema.names)}): pass --text-column NAME"
            )
        texts = pq.read_table(p, columns=[text_column]).column(text_column).to_pylist()
    elif suffix in (".jsonl", ".ndjson"):
        from core.jsonl import iter_jsonl

        texts = []
        for n, row in iter_jsonl(p):
            if not isinstance(row, dict) or text_column not in row:
                raise InputError(f"{p}:{n}: no {text_column!r} field: pass --text-column NAME")
            texts.append(row[text_column])
    elif suffix in (".csv", ".tsv"):
        texts = _table_column(p, text_column)
    elif suffix in (".txt", ".text"):
        with open(p, encoding="utf-8", errors="replace") as f:
            texts = f.read().split("\n")
        if texts and texts[-1] == "":
            texts.pop()
    else:
        raise InputError(
            f"{p}: unknown input format {suffix or '(no suffix)'!r}; give .txt (one text per line), .csv or .tsv "
            "(with a header; --text-column names the column), .parquet or .jsonl"
        )
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        where = ", ".join(str(i + 1) for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InputError(
            f"{p}: row(s) {where} are null, empty or whitespace-only and cannot be embedded: remove "
            "them (or use `fbas-pipeline ingest`, which quarantines such rows and keeps the rest)"
        )
    return texts


def _table_column(p: Path, text_column: str) -> list:
    """The text column of a CSV/TSV file with a header row (never its raw lines)."""
    import pyarrow as pa
    from pyarrow import csv

    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    try:
        table = csv.read_csv(p, parse_options=csv.ParseOptions(delimiter=delimiter, newlines_in_values=True))
    except pa.ArrowInvalid as e:
        raise InputError(f"{p} is not a readable {p.suffix[1:].upper()} table ({e}): fix it or convert it") from None
    if text_column not in table.column_names:
        raise InputError(
            f"{p} has no column {text_column!r} in its header (columns: {', '.join(table.column_names)}): pass "
            "--text-column NAME"
        )
    return table.column(text_column).to_pylist()


def embed_texts(texts: list[str], engine, tokenizer, chunk: int = 4096, progress=None) -> np.ndarray:
    """Embed in chunks (tokenize, engine) and return float32 [n, dim] in input order."""
    out = np.empty((len(texts), engine.dim), dtype=np.float32)
    for start in range(0, len(texts), chunk):
        enc = tokenizer.encode(texts[start : start + chunk])
        out[start : start + len(enc)] = engine.embed(enc.token_ids, enc.lengths)
        if progress:
            progress(len(enc))
    return out


def embed_file(
    input_path: str | Path,
    model_dir: str | Path,
    out_path: str | Path,
    runtime: RuntimeConfig,
    text_column: str = "text",
) -> tuple[int, int]:
    from engine.model_dir import load_engine, load_tokenizer, read_meta
    from pipeline.ingest.progress import progress_bar

    texts = read_texts(input_path, text_column)
    meta = read_meta(model_dir)
    engine = load_engine(
        model_dir, threads=runtime.threads, token_budget=runtime.token_budget, max_batch=runtime.max_batch_size
    )
    tokenizer = load_tokenizer(model_dir, meta)
    with progress_bar(len(texts), "embedding", unit="doc") as bar:
        vectors = embed_texts(texts, engine, tokenizer, progress=bar.update)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, vectors)
    os.replace(tmp, out)
    return vectors.shape
