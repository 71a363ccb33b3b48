"""Corpus reading and validation: Parquet file, folder, glob or object-store URI -> record batches.

    corpus = open_corpus("corpus/", cfg.corpus)     # lists files, reads footers, validates the schema
    for rb in corpus.batches():                      # RowBatch: row0, ids, texts (None where unusable), flags
        ...

The corpus is read as a stream of record batches (``batch_rows`` rows at a time, a few MB);
nothing ever holds the whole corpus. Files are read in sorted path order, rows in file
order, so a row's position (``row_id``, int64) is the same on every pass and every run.

Validation done here (before anything is enqueued; ``InputError`` names the column and the fix):

* the text column exists in every file and holds strings (``string``, ``large_string``,
  ``string_view``, a dictionary of strings, or ``binary`` decoded as UTF-8);
* the id column, when present, holds integers or strings and no nulls; when the default
  ``id`` column is absent the row position is the id (an explicitly named id column must exist);
* the optional title column exists and holds strings.

Id uniqueness needs every id, so a new job first reads the id column alone
(``pipeline.ingest.plan.corpus_id_hashes`` + ``check_unique_ids``) with ``id_hashes`` below: 64-bit
hashes, sorted, collisions confirmed on the real ids.

Texts: invalid UTF-8 is replaced with U+FFFD and the row flagged ``repaired``; ``None`` marks
a null text. Empty and whitespace-only texts are returned as they are; the scan quarantines them.
"""

from __future__ import annotations

import fnmatch
import logging
import posixpath
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.config import CorpusConfig, fingerprint
from core.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["Corpus", "CorpusFile", "RowBatch", "open_corpus", "decode_texts", "ReadAhead", "READ_BATCH_ROWS"]

READ_BATCH_ROWS = 32_768  # rows per record batch read from Parquet (a few MB of text)
DEFAULT_ID_COLUMN = "id"


@dataclass(frozen=True)
class CorpusFile:
    """One Parquet file of the corpus."""

    path: str  # path inside the filesystem (as pyarrow.fs spells it)
    size: int  # bytes
    num_rows: int
    row0: int  # row_id of its first row


@dataclass
class RowBatch:
    """A slice of the corpus: rows ``row0 .. row0 + len(texts) - 1``."""

    row0: int
    ids: list  # original ids (int or str); the row position where the corpus has no id column
    id_array: pa.Array | None  # the same ids as read (None for row-position ids), for vectorized hashing
    texts: list[str | None]  # None = null text; title + " " + text where a title column is used
    repaired: np.ndarray  # bool [n]: invalid UTF-8 was replaced in this row
    titles: list[str | None] | None = None  # with ``split_title``: the titles, kept apart from the texts

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Corpus:
    """A validated corpus: its files, columns and id type; ``batches()`` streams it."""

    uri: str
    fs: pafs.FileSystem
    files: list[CorpusFile]
    text_column: str
    id_column: str | None  # None: the row position is the id
    title_column: str | None
    id_type: str  # "int64" | "string"
    n_rows: int
    fingerprint: str = ""
    columns: list[str] = field(default_factory=list)

    def batches(
        self, batch_rows: int = READ_BATCH_ROWS, start: int = 0, stop: int | None = None, split_title: bool = False
    ) -> Iterator[RowBatch]:
        """Every row in order, ``batch_rows`` at a time (texts decoded; ids in their original type). With
        ``start``/``stop``, only the files and row groups that hold rows ``start .. stop - 1`` are read (the
        batches may hold rows around them). With ``split_title``, titles come in ``RowBatch.titles`` and the
        texts are the text column's alone (chunking cuts the text and puts the title before each chunk)."""
        cols = [c for c in (self.id_column, self.text_column, self.title_column) if c]
        whole = start <= 0 and stop is None
        stop = self.n_rows if stop is None else stop
        row = 0
        for f in self.files:
            if f.num_rows == 0 or f.row0 >= stop or f.row0 + f.num_rows <= start:
                row = f.row0 + f.num_rows
                continue
            with self.fs.open_input_file(f.path) as handle:
                pf = pq.ParquetFile(handle, **self._read_options())
                groups, row = _row_groups(pf.metadata, f.row0, start, stop)
                kw: dict[str, Any] = {"row_groups": groups} if not whole else {}
                for rb in _checked(pf, f.path, batch_size=batch_rows, columns=cols, use_threads=True, **kw):
                    n = rb.num_rows
                    id_array = rb.column(self.id_column) if self.id_column else None
                    ids = id_array.to_pylist() if id_array is not None else list(range(row, row + n))
                    texts, repaired = decode_texts(rb.column(self.text_column))
                    kept: list[str | None] | None = None
                    if self.title_column:
                        titles, rep_t = decode_texts(rb.column(self.title_column))
                        if split_title:
                            kept = titles
                        else:
                            texts = [
                                t if (t is None or not t.strip() or not ti or not ti.strip()) else f"{ti} {t}"
                                for ti, t in zip(titles, texts)
                            ]
                        repaired |= rep_t
                    yield RowBatch(row, ids, id_array, texts, repaired, kept)
                    row += n
        if whole and row != self.n_rows:
            raise InputError(
                f"{self.uri} changed while it was read ({row} rows now, {self.n_rows} in the footers): "
                "do not modify a corpus during an ingest"
            )

    def _read_options(self) -> dict[str, Any]:
        """Local files are read page by page through a small buffer instead of a whole row group's column at
        once: the first rows of a large row group arrive much sooner, and the whole file reads faster too.
        Remote files keep Arrow's defaults, which fetch a row group's columns in a few large requests."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return {"buffer_size": 1 << 20, "pre_buffer": False}
        return {}

    def id_arrays(self, batch_rows: int = READ_BATCH_ROWS) -> Iterator[tuple[int, pa.Array | None, int]]:
        """(row0, id array or None for row-position ids, n) per record batch, without reading texts."""
        row = 0
        for f in self.files:
            if f.num_rows == 0:
                continue
            if self.id_column is None:
                yield row, None, f.num_rows
                row += f.num_rows
                continue
            with self.fs.open_input_file(f.path) as handle:
                for rb in _checked(pq.ParquetFile(handle), f.path, batch_size=batch_rows, columns=[self.id_column]):
                    yield row, rb.column(0), rb.num_rows
                    row += rb.num_rows


def _row_groups(md: pq.FileMetaData, row0: int, start: int, stop: int) -> tuple[list[int], int]:
    """The row groups of a file (its first row ``row0`` in the corpus) that hold rows ``start .. stop - 1``,
    and the corpus row of the first one."""
    groups, first, at = [], None, row0
    for rg in range(md.num_row_groups):
        n = md.row_group(rg).num_rows
        if at < stop and at + n > start:
            groups.append(rg)
            first = at if first is None else first
        at += n
    return groups, row0 if first is None else first


def _checked(pf: pq.ParquetFile, path: str, **kw: Any) -> Iterator[pa.RecordBatch]:
    """``pf.iter_batches(**kw)``, with a damaged page (bad compression, a truncated file) reported as an
    ``InputError`` that names the file and the row group instead of Arrow's bare error."""
    it = pf.iter_batches(**kw)
    done = 0
    while True:
        try:
            rb = next(it)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as e:
            raise InputError(
                f"{path}: {_damaged_row_group(pf, done, kw.get('columns'))} cannot be read ({e}): repair or "
                "replace the file if it is damaged, or wait until its storage answers if it is remote, then rerun "
                "the same command (batches already finished are kept)"
            ) from None
        done += rb.num_rows
        yield rb


def _damaged_row_group(pf: pq.ParquetFile, done: int, columns: list[str] | None) -> str:
    """Which row group a failed read hit: the first one, from the one holding row ``done`` on, that cannot be
    read on its own (a record batch may span several)."""
    md, first = pf.metadata, 0
    for rg in range(md.num_row_groups):
        n = md.row_group(rg).num_rows
        if first + n > done:
            try:
                pf.read_row_group(rg, columns=columns)
            except (OSError, pa.ArrowException):
                return f"row group {rg} (rows {first}-{first + n - 1} of this file)"
        first += n
    return f"the data after row {done}"


# --------------------------------------------------------------------------------------------------
# opening and validation


def _resolve(uri: str) -> tuple[pafs.FileSystem, list[str], str]:
    """(filesystem, sorted Parquet paths, how to name it in messages) for a file, folder, glob or URI."""
    has_glob = any(ch in uri for ch in "*?[")
    if "://" in uri:
        base = uri
        pattern = None
        if has_glob:  # glob on the last path components: s3://b/corpus/*.parquet
            head, pattern = uri.rsplit("/", 1)
            base = head
        try:
            fs, path = pafs.FileSystem.from_uri(base)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise InputError(f"cannot open corpus {uri}: {e}") from None
    else:
        fs = pafs.LocalFileSystem()
        if has_glob:
            p = Path(uri).expanduser()
            parts = p.parts
            first = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
            path = str(Path(*parts[:first]).resolve()) if first else str(Path.cwd())
            pattern = str(Path(*parts[first:]))
        else:
            path, pattern = str(Path(uri).expanduser().resolve()), None
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(
            f"corpus {uri} does not exist: pass a Parquet file, a folder of Parquet files, a glob "
            "or an object-store URI"
        )
    if info.type == pafs.FileType.File and pattern is None:
        return fs, [path], uri
    sel = pafs.FileSelector(path, recursive=True)
    paths = []
    for fi in fs.get_file_info(sel):
        if fi.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(fi.path, path)
        name = posixpath.basename(fi.path)
        if name.startswith((".", "_")):  # _SUCCESS, _metadata, .crc, hidden temp files
            continue
        if pattern is not None:
            if fnmatch.fnmatch(rel, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(rel, pattern[3:])):
                paths.append(fi.path)
        elif name.endswith((".parquet", ".parq", ".pq")):
            paths.append(fi.path)
    if not paths:
        raise InputError(f"corpus {uri} holds no Parquet files (*.parquet): check the path or the glob")
    return fs, sorted(paths), uri


def _is_text_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text_type(t.value_type)
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or getattr(pa.types, "is_string_view", lambda _t: False)(t)
    )


def _require_string_column(
    schema: pa.Schema, where: str, role: str, name: str, fix_missing: str, fix_type: str
) -> None:
    """Refuse a corpus whose ``role`` column (text, title) is missing or not a string column."""
    if name not in schema.names:
        raise InputError(f"{where} has no {role} column {name!r} (columns: {', '.join(schema.names)}): {fix_missing}")
    t = schema.field(name).type
    if not _is_text_type(t):
        raise InputError(f"{where}: {role} column {name!r} has type {t}, not string: {fix_type}")


def _id_kind(t: pa.DataType) -> str | None:
    if pa.types.is_integer(t):
        return "int64"
    if pa.types.is_dictionary(t):
        return _id_kind(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _t: False)(t):
        return "string"
    return None


def open_corpus(uri: str | Path, cfg: CorpusConfig) -> Corpus:
    """List and validate a corpus (reads only the Parquet footers); raise ``InputError`` with the fix."""
    uri = str(uri)
    fs, paths, shown = _resolve(uri)
    files: list[CorpusFile] = []
    id_column: str | None = cfg.id_column
    id_kind: str | None = None
    row0 = 0
    names: list[str] = []
    for i, path in enumerate(paths):
        md = _footer(fs, path)
        schema = md.schema.to_arrow_schema()
        names = schema.names
        where = f"{path}" if len(paths) > 1 else shown
        _check_text_columns(schema, where, cfg)
        id_column, id_kind = _check_id_column(schema, where, cfg, id_column, id_kind, first=i == 0)
        files.append(CorpusFile(path, fs.get_file_info(path).size, md.num_rows, row0))
        row0 += md.num_rows
    corpus = Corpus(
        uri=shown,
        fs=fs,
        files=files,
        text_column=cfg.text_column,
        id_column=id_column,
        title_column=cfg.title_column,
        id_type=id_kind or "int64",
        n_rows=row0,
        columns=names,
    )
    common = posixpath.commonpath([f.path for f in files]) if len(files) > 1 else posixpath.dirname(files[0].path)
    corpus.fingerprint = fingerprint(
        {
            "files": [(posixpath.relpath(f.path, common), f.size, f.num_rows) for f in files],
            "text": cfg.text_column,
            "id": id_column,
            "title": cfg.title_column,
        }
    )
    logger.info(
        "corpus %s: %d file(s), %d rows, id %s (%s)",
        shown,
        len(files),
        row0,
        id_column or "<row position>",
        corpus.id_type,
    )
    return corpus


def _footer(fs: pafs.FileSystem, path: str) -> pq.FileMetaData:
    """A corpus file's Parquet footer, or an ``InputError`` naming the file."""
    try:
        with fs.open_input_file(path) as handle:
            return pq.ParquetFile(handle).metadata
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path} is not a readable Parquet file ({e}): remove it from the corpus or fix it") from None


def _check_text_columns(schema: pa.Schema, where: str, cfg: CorpusConfig) -> None:
    """The text column (and the title column, when asked for) must exist and hold strings."""
    _require_string_column(
        schema,
        where,
        "text",
        cfg.text_column,
        "pass --text-column NAME",
        "cast it to string or pass --text-column with a string column",
    )
    if cfg.title_column:
        _require_string_column(
            schema,
            where,
            "title",
            cfg.title_column,
            "pass --title-column NAME, or leave it out",
            "cast it to string",
        )


def _check_id_column(
    schema: pa.Schema, where: str, cfg: CorpusConfig, id_column: str | None, id_kind: str | None, first: bool
) -> tuple[str | None, str | None]:
    """The id column and its kind after one more file: the default ``id`` may be absent from every file (row
    positions are the ids), an id column named by the user must exist, and all files share one id type."""
    names = schema.names
    if id_column is not None and id_column not in names:
        if id_column == DEFAULT_ID_COLUMN and first:
            logger.info("%s has no 'id' column: the row position is the id", where)
            return None, id_kind
        raise InputError(
            f"{where} has no id column {id_column!r} (columns: {', '.join(names)}): pass "
            "--id-column NAME (ids must be unique integers or strings)"
        )
    if id_column is None:
        if DEFAULT_ID_COLUMN in names and cfg.id_column == DEFAULT_ID_COLUMN and not first:
            raise InputError(f"{where} has an 'id' column but earlier files do not: give every file the same columns")
        return None, id_kind
    kind = _id_kind(schema.field(id_column).type)
    if kind is None:
        raise InputError(
            f"{where}: id column {id_column!r} has type {schema.field(id_column).type}; ids must "
            "be integers or strings: cast the column, or pass --id-column with another column"
        )
    if id_kind is not None and kind != id_kind:
        raise InputError(
            f"{where}: id column {id_column!r} is {kind} here but {id_kind} in earlier files: "
            "use one id type across the corpus"
        )
    return id_column, kind


# --------------------------------------------------------------------------------------------------
# texts and ids


def decode_texts(arr: pa.Array | pa.ChunkedArray) -> tuple[list[str | None], np.ndarray]:
    """Python strings (None for nulls) and a bool mask of rows whose invalid UTF-8 was replaced."""
    if isinstance(arr, pa.ChunkedArray):
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    n = len(arr)
    repaired = np.zeros(n, dtype=bool)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            arr.validate(full=True)
            return arr.to_pylist(), repaired
        except pa.ArrowInvalid:
            arr = arr.view(pa.binary() if pa.types.is_string(t) else pa.large_binary())
    elif not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        arr = arr.cast(pa.large_string())  # string_view and friends
        return arr.to_pylist(), repaired
    out: list[str | None] = []
    for i, b in enumerate(arr.to_pylist()):
        if b is None:
            out.append(None)
            continue
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(b.decode("utf-8", errors="replace"))
            repaired[i] = True
    return out, repaired


def cast_ids(ids: list, id_type: str) -> pa.Array:
    """Ids as they travel in messages (int or str) -> the Arrow array written to the output."""
    return pa.array(ids, type=pa.int64() if id_type == "int64" else pa.string())


T = TypeVar("T")
_END = object()


class ReadAhead(Iterator[T]):
    """``items``, produced on a background thread that starts at once: at most ``depth`` items wait for the
    consumer, plus the one the producer is making (the ingest scans its first window while Celery and Redis
    are set up, and the next window while this one's batches wait for room in the queue). What the producer
    raises is raised by ``next``, in order; ``close()`` (or leaving the ``with`` block) stops the producer
    once its current item is made, and waits for that."""

    def __init__(self, items: Iterable[T], depth: int = 1, name: str = "read-ahead") -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterable[T]) -> None:
        try:
            for x in items:
                if not self._put((x, None)):
                    return
            self._put((_END, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put((_END, e))

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        while True:
            try:
                x, err = self._q.get(timeout=0.1)
                break
            except queue.Empty:
                if self._stop.is_set() and not self._thread.is_alive():  # cancelled: nothing more comes
                    self._done = True
                    raise StopIteration from None
        if x is _END:
            self.close()
            if err is not None:
                raise err
            raise StopIteration
        return x

    def cancel(self) -> None:
        """Ask the producer to stop after its current item, without waiting (``close`` waits); ``next`` then
        gives what was already made, then stops."""
        self._stop.set()

    def close(self) -> None:
        self._done = True
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
