"""Hits' texts, read back from the corpus a job embedded: ``job.json`` (and so the manifest) records each
corpus file's path, size and row count, so a hit's row id names a file and a row in it.

    reader = CorpusText(manifest["corpus"])
    reader.problem            # None, or why texts cannot be shown (a file moved, changed or gone)
    reader.rows([17, 4], ["title"])   # [{"text": ..., "title": ...}, ...] in the order asked
"""

from __future__ import annotations

import bisect
import os
from typing import Any

import pyarrow.dataset as ds
import pyarrow.fs as pafs

__all__ = ["CorpusText"]


class CorpusText:
    """Reads rows of a job's corpus by row id (see the module docstring)."""

    def __init__(self, corpus: dict[str, Any]) -> None:
        self.text_column = corpus.get("text_column", "text")
        self.files: list[tuple[str, int, int]] = [(str(p), int(s), int(n)) for p, s, n in corpus.get("file_list") or []]
        self.starts: list[int] = []
        row = 0
        for _, _, n in self.files:
            self.starts.append(row)
            row += n
        self.fs: pafs.FileSystem = pafs.LocalFileSystem()
        uri = str(corpus.get("uri", ""))
        if "://" in uri and not uri.startswith("file://"):
            self.fs = pafs.FileSystem.from_uri(uri)[0]
        self.problem = self._check(corpus)

    def _check(self, corpus: dict[str, Any]) -> str | None:
        if not self.files:
            return "this job's record lists no corpus files (an ingest before texts could be shown): rerun it"
        for path, size, _ in self.files:
            try:
                now = (
                    self.fs.get_file_info(path).size
                    if not isinstance(self.fs, pafs.LocalFileSystem)
                    else (os.stat(path).st_size)
                )
            except OSError:
                now = None
            if now is None:
                return f"the corpus file {path} is gone"
            if now != size:
                return f"the corpus file {path} changed since the ingest ({size} bytes then, {now} now)"
        return None

    def rows(self, row_ids: list[int], columns: list[str] | None = None) -> list[dict[str, Any]]:
        """``{text, *columns}`` for each row id, in the order given."""
        cols = [self.text_column, *[c for c in columns or [] if c != self.text_column]]
        by_file: dict[int, list[tuple[int, int]]] = {}
        n_rows = self.starts[-1] + self.files[-1][2] if self.files else 0
        for k, r in enumerate(row_ids):
            if r >= n_rows:  # a row kept from an earlier corpus (ingest --update --keep-missing): no text here
                continue
            f = bisect.bisect_right(self.starts, r) - 1
            by_file.setdefault(f, []).append((k, r - self.starts[f]))
        out: list[dict[str, Any]] = [{} for _ in row_ids]
        for f, wanted in by_file.items():
            dataset = ds.dataset(self.files[f][0], format="parquet", filesystem=self.fs)
            missing = [c for c in cols if c not in dataset.schema.names]
            if missing:
                from core.errors import InputError

                raise InputError(
                    f"the corpus has no column {missing[0]!r} (columns: {', '.join(dataset.schema.names)}): "
                    "name one of these in --columns"
                )
            table = dataset.take([local for _, local in wanted], columns=cols).to_pylist()
            for (k, _), row in zip(wanted, table):
                out[k] = {("text" if c == self.text_column else c): row[c] for c in cols}
        return out
