"""The output folder: every file name under OUT/, confined paths and atomic writes.

    OUT/manifest.json                         written last by finalize: the job's record and checksums
    OUT/index.faiss                           the merged index (ids = row_id)
    OUT/quarantine.parquet                    row_id, id, reason (only when rows were not embedded)
    OUT/vectors/part-000123.parquet           row_id int64, id, embedding fixed_size_list<float32>[dim],
                                              n_tokens int32, truncated bool, repaired bool; a chunked job's
                                              row_id numbers chunks, and doc_row int64 (the document's row),
                                              chunk int32, tok_start/tok_end int32, char_start/char_end int64
                                              follow (``core.formats.CHUNK_FIELDS``)
    OUT/.fbas/quarantine/part-000123.parquet  the batch's quarantined rows (only when it has some)
    OUT/.fbas/job.json, scan.npz, plan.npz    what a rerun resumes (``core.formats``); job.pending while
                                              a new job's scan runs; quarantine-scan.parquet
    OUT/.fbas/scan.id_hash.bin, scan.n_tokens.bin, plan.order.bin
                                              their per-row arrays, raw, mapped rather than read (``rows_file``,
                                              ``core.rowfile``)
    OUT/.fbas/model/, model.spec, local/      the built model, its build key, local mode's services
    OUT/.fbas/content.npz, generations.json   ``ingest --update``: each row's id key and text hash, and the
                                              generations so far; prev/ holds the generation an update replaces
                                              until the new one is final, update/ the rows it embeds

Part names are a pure function of the batch index, so a batch delivered twice writes the same
files. Every file is written to ``<name>.tmp-<host>-<pid>-<random>`` in the same folder,
flushed to disk and renamed over the final name (``os.replace``): a reader sees the old file,
the new one, or nothing, never half a file. A vectors part's Parquet footer (``fbas`` key) says
which job and batch it belongs to, so files from another run are recognised and never merged.
Every path is built inside the output folder and checked to stay inside it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import ConfigError, InputError
from core.processes import pid_alive

__all__ = [
    "OutputDir",
    "drop_cached",
    "part_name",
    "read_part_meta",
    "vectors_schema",
    "FORMAT",
    "META_KEY",
    "VECTORS",
    "STATE",
    "QUARANTINE",
    "MANIFEST",
    "INDEX_FILE",
    "JOB_FILE",
    "PENDING_FILE",
    "SCAN_QUARANTINE",
    "SCAN_FILE",
    "PLAN_FILE",
    "ROW_FILES",
    "rows_file",
    "QUARANTINE_FILE",
    "MODEL_SUBDIR",
    "MODEL_SPEC",
    "LOCAL_SUBDIR",
    "LOCK_FILE",
    "CONTENT_FILE",
    "GENERATIONS_FILE",
    "PREV_SUBDIR",
    "UPDATE_SUBDIR",
    "FolderLock",
    "PART_RE",
]

FORMAT = 1  # the parts' footer format
META_KEY = b"fbas"  # the Parquet footer key of a part's metadata

# folders under OUT/
VECTORS, STATE, QUARANTINE = "vectors", ".fbas", ".fbas/quarantine"
# files under OUT/
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
QUARANTINE_FILE = "quarantine.parquet"
# files under OUT/.fbas/
JOB_FILE = "job.json"
PENDING_FILE = "job.pending"  # a new job's id while its scan runs (job.json is written after the last window)
SCAN_FILE = "scan.npz"
PLAN_FILE = "plan.npz"
SCAN_QUARANTINE = "quarantine-scan.parquet"
# the per-row arrays of scan.npz and plan.npz, each in a file of its own (``rows_file``)
ROW_FILES = ("scan.id_hash.bin", "scan.n_tokens.bin", "plan.order.bin")
MODEL_SUBDIR = "model"  # the built model the job serves
MODEL_SPEC = "model.spec"  # its build key
LOCAL_SUBDIR = "local"  # local mode's services: logs, pids, Redis's files
LOCK_FILE = "lock"  # the owner lock of a running job (FolderLock)
CONTENT_FILE = "content.npz"  # --update: id keys and text hashes of the generation in OUT
GENERATIONS_FILE = "generations.json"  # --update: what each generation changed
PREV_SUBDIR = "prev"  # --update: the generation being replaced, until the new one is final
UPDATE_SUBDIR = "update"  # --update: the rows to embed (delta.parquet) and their ingest

PART_RE = re.compile(r"^part-(\d{6,})\.parquet$")


def part_name(batch: int, suffix: str = ".parquet") -> str:
    """``part-000123.parquet``: six digits or more, so names sort in batch order up to a million batches."""
    if batch < 0:
        raise ValueError(f"batch index {batch} < 0")
    return f"part-{batch:06d}{suffix}"


def rows_file(npz: Path, field: str) -> Path:
    """Where the array ``field`` of the state file ``npz`` (``scan.npz``, ``plan.npz``) is kept, raw, beside it:
    ``scan.id_hash.bin`` (``ROW_FILES``)."""
    return npz.with_name(f"{npz.stem}.{field}.bin")


def vectors_schema(dim: int, id_type: str, meta: dict | None = None, chunked: bool = False) -> pa.Schema:
    fields = [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("id", pa.int64() if id_type == "int64" else pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("repaired", pa.bool_(), nullable=False),
    ]
    if chunked:
        fields += [
            pa.field("doc_row", pa.int64(), nullable=False),
            pa.field("chunk", pa.int32(), nullable=False),
            pa.field("tok_start", pa.int32(), nullable=False),
            pa.field("tok_end", pa.int32(), nullable=False),
            pa.field("char_start", pa.int64(), nullable=False),
            pa.field("char_end", pa.int64(), nullable=False),
        ]
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()} if meta else None)


def drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Let the kernel drop a file's written-back pages from its cache (``length`` 0: to the end): bytes that are
    not read again. The memory is then reused for the next writes instead of growing the cache, which on a
    virtual machine costs more than the copy itself (writing 6.3 MB parts on the 2-core VM: 15 ms a part when
    the cache grows, 1.5 ms when it is recycled)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only


class OutputDir:
    """A local (or shared-filesystem) output folder with confined paths and atomic writes."""

    def __init__(self, root: str | Path) -> None:
        s = str(root)
        if s.startswith("file://"):
            s = s[len("file://") :]
        elif "://" in s:
            raise ConfigError(
                f"output {s!r}: object-store outputs are not supported yet; write to a local or shared "
                "folder (every worker must see the same path)"
            )
        self.root = Path(s).expanduser().resolve()
        self._dirs: dict[str, Path] = {}

    def __str__(self) -> str:
        return str(self.root)

    def path(self, rel: str) -> Path:
        """``root/rel``, refusing anything that would leave the output folder."""
        p = (self.root / rel).resolve()
        if p != self.root and self.root not in p.parents:
            raise InputError(f"path {rel!r} would leave the output folder {self.root}: refused")
        return p

    def vectors_part(self, batch: int) -> Path:
        return self._dir(VECTORS) / part_name(batch)

    def quarantine_part(self, batch: int) -> Path:
        return self._dir(QUARANTINE) / part_name(batch)

    def _dir(self, rel: str) -> Path:
        """``path(rel)``, checked once per folder: a part's name is built from an integer, so it stays inside
        (finalize looks up every part's path two or three times; resolving each cost 0.46 s at 2,442 parts)."""
        got = self._dirs.get(rel)
        if got is None:
            got = self._dirs[rel] = self.path(rel)
        return got

    def state(self, name: str) -> Path:
        return self.path(f"{STATE}/{name}")

    def make_dirs(self) -> None:
        for d in (VECTORS, QUARANTINE):
            self.path(d).mkdir(parents=True, exist_ok=True)

    def lock(self) -> FolderLock:
        """The folder's owner lock (``OUT/.fbas/lock``): take it with ``with out.lock():`` for a job's life."""
        return FolderLock(self.state(LOCK_FILE))

    @staticmethod
    def stale_temp(path: Path) -> bool:
        """Whether a temp file (``temp_path``'s name) is provably abandoned: written by a process of this host
        that no longer runs. A live writer's file, or another host's, is never called stale."""
        _, sep, suffix = path.name.rpartition(".tmp-")
        parts = suffix.rsplit("-", 2)
        if not sep or len(parts) != 3 or not parts[1].isdigit():
            return False
        host, pid = parts[0], int(parts[1])
        return host == socket.gethostname() and pid != os.getpid() and not pid_alive(pid)

    @staticmethod
    def remove_stale_temps(final: Path) -> None:
        """Remove ``final``'s temp files (``temp_path``'s names) whose writer is provably gone (``stale_temp``)."""
        for tmp in final.parent.glob(f"{final.name}.tmp-*"):
            if OutputDir.stale_temp(tmp):
                tmp.unlink(missing_ok=True)

    @staticmethod
    def temp_path(final: Path) -> Path:
        """A new temp name beside ``final``: ``<name>.tmp-<host>-<pid>-<random>`` (what cleanup looks for)."""
        return final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    @staticmethod
    def write_atomic(
        final: Path, write: Callable[[Path], object], keep_existing: Callable[[Path], bool] | None = None
    ) -> bool:
        """``write(tmp_path)``, fsync, then rename over ``final``; the temp file is removed on any failure.

        With ``keep_existing``, the commit never replaces a file for which ``keep_existing(final)`` is true
        (hard link, which fails if the name exists, instead of rename): the first commit of a batch wins
        and later duplicate deliveries change nothing. Returns False when the existing file was kept."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = OutputDir.temp_path(final)
        try:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if keep_existing is None:
                os.replace(tmp, final)
                return True
            try:
                os.link(tmp, final)
            except FileExistsError:
                if keep_existing(final):
                    return False
                os.replace(tmp, final)  # a stray file from another job under our name: ours replaces it
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def read_part_meta(self, batch: int) -> dict | None:
        """The ``fbas`` footer metadata of a committed vectors part, or None if absent or unreadable."""
        return read_part_meta(self.vectors_part(batch))


def read_part_meta(path: Path | pa.NativeFile) -> dict | None:
    try:
        md = pq.read_schema(path).metadata or {}
        return json.loads(md[META_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowInvalid):
        return None


class FolderLock:
    """One owner per output folder: an exclusive ``flock`` on ``OUT/.fbas/lock``, held for the job's life.

    The kernel drops the lock when its holder exits, however it exits (``kill -9`` included), so a lock is
    stale exactly when its holder is dead and needs no clean-up. The file names the holder (pid, host,
    command, start time), for the refusal a second job gets."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            raise InputError(
                f"{self.path.parent.parent} is in use by another job ({_describe(other)}): wait for it to finish, "
                "or write to another --out"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(os.path.basename(a) for a in sys.argv[:2]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
        return f"pid {h['pid']} on host {h['host']}, {h.get('command', '?')}, since {h.get('since', '?')}"
    except (ValueError, KeyError, TypeError):
        return "its holder did not say who it is"
