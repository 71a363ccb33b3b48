"""A job's identity and its files: the job id (corpus + model + batch settings), resuming a saved scan and
plan, saving them (``job.json`` last), and registering the job in Redis with what the folder holds."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from core.chunking import ChunkSpec
from core.config import FbasConfig, fingerprint
from core.errors import InputError
from core.formats import Plan, Scan
from core.layout import JOB_FILE, MODEL_SUBDIR, PENDING_FILE, PLAN_FILE, SCAN_FILE, SCAN_QUARANTINE, STATE, OutputDir
from engine.model_dir import ModelMeta
from output.check import committed_parts
from pipeline.ingest.plan import FIRST_WINDOW, PLAN_VERSION
from pipeline.ingest.read import Corpus
from workers.jobstate import JobState

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

__all__ = [
    "IngestResult",
    "JobContext",
    "Job",
    "chunk_spec",
    "first_window",
    "length_mode",
    "resume_job",
    "save_job",
    "forget_scan",
    "register_job",
]


@dataclass
class IngestResult:
    """What an ingest did (the manifest has the details)."""

    out: Path
    job: str
    manifest: dict
    seconds: float
    resumed_batches: int
    sent_batches: int
    docs_this_run: int = 0  # rows embedded or quarantined by this run (not by an earlier, resumed one)


@dataclass(frozen=True)
class JobContext:
    """What every step of an ingest works on: the corpus, the settings, the output folder and the model."""

    corpus: Corpus
    cfg: FbasConfig
    out: OutputDir
    meta: ModelMeta
    generation: int = 0  # ``ingest --update``: the generation this job writes (0: a plain job)

    @cached_property
    def job_id(self) -> str:
        """The job's identity: corpus fingerprint + model fingerprint + batch settings (+ the generation of an
        update, whose batches are the parts it writes, not planned ones)."""
        if self.generation:
            return fingerprint(
                {"corpus": self.corpus.fingerprint, "model": self.meta.fingerprint, "generation": self.generation}
            )
        return fingerprint(
            {"corpus": self.corpus.fingerprint, "model": self.meta.fingerprint, "settings": _batch_settings(self.cfg)}
        )


@dataclass
class Job:
    """A planned job: identity, scan and plan."""

    id: str
    info: dict
    scan: Scan
    plan: Plan
    resumed_scan: bool


def _batch_settings(cfg: FbasConfig) -> dict[str, int | str]:
    c = cfg.corpus
    settings: dict[str, int | str] = {
        "batch_tokens": c.batch_tokens,
        "batch_rows": c.batch_rows,
        "plan_window": c.plan_window,
        "first_window": first_window(cfg),
        "plan_version": PLAN_VERSION,
    }
    spec = chunk_spec(cfg)
    if spec is not None:  # named only then: unchunked jobs keep their ids
        settings["chunk"] = spec.label()
    elif length_mode(cfg) == "estimate":  # named only then: jobs planned on exact lengths keep their ids
        settings["lengths"] = "estimate"
    return settings


def chunk_spec(cfg: FbasConfig) -> ChunkSpec | None:
    """The job's chunking (``corpus.chunk``), or None."""
    return ChunkSpec.parse(cfg.corpus.chunk)


def first_window(cfg: FbasConfig) -> int:
    """Rows of a job's first plan window (``corpus.first_window``; 0 = by target, see its help)."""
    c = cfg.corpus
    if c.first_window:
        return min(c.first_window, c.plan_window)
    return min(FIRST_WINDOW, c.plan_window) if cfg.engine.target == "gpu" else c.plan_window


def length_mode(cfg: FbasConfig) -> str:
    """``exact`` or ``estimate`` (``corpus.lengths``; auto = estimate where the engine does not pad: gpu). A
    chunked job's lengths are exact: chunking tokenizes every text anyway."""
    if chunk_spec(cfg) is not None:
        return "exact"
    mode = cfg.corpus.lengths
    if mode == "auto":
        return "estimate" if cfg.engine.target == "gpu" else "exact"
    return mode


def resume_job(ctx: JobContext) -> Job | None:
    """The same job's saved scan and plan from ``OUT/.fbas/`` (None if there are none yet); refuse a folder
    that holds another job."""
    job_id, out = ctx.job_id, ctx.out
    job_path = out.state(JOB_FILE)
    if not job_path.exists():
        pending = out.state(PENDING_FILE)
        if pending.exists():
            other = json.loads(pending.read_text(encoding="utf-8"))
            if other.get("job") != job_id:
                raise InputError(
                    f"{out} holds the parts of job {other.get('job')} (corpus {other.get('corpus')}), "
                    f"stopped before its scan finished, not this one ({job_id}): rerun that job to "
                    "finish it, use another --out, or delete the folder to start over"
                )
        return None
    old = json.loads(job_path.read_text(encoding="utf-8"))
    if old.get("job") != job_id:
        raise InputError(
            f"{out} holds job {old.get('job')} (corpus {old.get('corpus', {}).get('uri')}, model "
            f"{old.get('model', {}).get('fingerprint')}), not this one ({job_id}): use another --out, "
            "or delete the folder to start over"
        )
    if out.state(SCAN_FILE).exists() and out.state(PLAN_FILE).exists():
        try:
            scan, plan = Scan.load(out.state(SCAN_FILE)), Plan.load(out.state(PLAN_FILE))
        except InputError as e:  # the plan is the same on every run: scanning again finds the committed parts
            logger.warning("job %s: its saved scan or plan cannot be used (%s); scanning again", job_id, e)
            return None
        if plan.n_batches == old.get("n_batches") and scan.n_documents == ctx.corpus.n_rows:
            logger.info("resuming job %s: reusing its scan and plan", job_id)
            return Job(job_id, old, scan, plan, True)
    return None


def forget_scan(out: OutputDir) -> None:
    """Before a new scan writes its per-row files (``scan.id_hash.bin`` ...): the saved scan and plan that name
    them go first, so a run killed meanwhile scans again rather than resume a plan of half-written rows (job.json
    may stay: without them it is not resumed)."""
    for name in (SCAN_FILE, PLAN_FILE):
        out.state(name).unlink(missing_ok=True)


def save_job(ctx: JobContext, scan: Scan, plan: Plan, extra: dict | None = None) -> Job:
    """Write ``scan.npz``, ``plan.npz``, the scan's quarantine and, last, ``job.json`` (what a rerun resumes);
    ``extra``: more keys for ``job.json`` (an update's ``generations``)."""
    corpus, cfg, out, job_id = ctx.corpus, ctx.cfg, ctx.out, ctx.job_id
    out.make_dirs()
    scan.save(out.state(SCAN_FILE))
    plan.save(out.state(PLAN_FILE))
    q_path = out.state(SCAN_QUARANTINE)
    if len(scan.q_rows):
        id_type = pa.int64() if corpus.id_type == "int64" else pa.string()
        qt = pa.table(
            {
                "row_id": pa.array(scan.q_rows, pa.int64()),
                "id": pa.array(scan.q_ids, id_type),
                "reason": pa.array(scan.q_reasons, pa.string()),
            }
        )
        OutputDir.write_atomic(q_path, lambda p: pq.write_table(qt, p))
    else:
        q_path.unlink(missing_ok=True)
    m, lengths = ctx.meta, length_mode(cfg)
    info = {
        "job": job_id,
        "n_batches": plan.n_batches,
        "planned_rows": plan.n_rows,
        "corpus": {
            "uri": corpus.uri,
            "fingerprint": corpus.fingerprint,
            "rows": corpus.n_rows,
            "text_column": corpus.text_column,
            "id_column": corpus.id_column,
            "title_column": corpus.title_column,
            "id_type": corpus.id_type,
            "files": len(corpus.files),
            # where each file is, its size and rows: what `search` reads hits' texts back from
            "file_list": [[f.path, f.size, f.num_rows] for f in corpus.files],
        },
        "model": {
            "name": m.name,
            "fingerprint": m.fingerprint,
            "dim": m.dim,
            "pooling": m.pooling,
            "normalize": m.normalize,
            "max_seq_len": m.max_seq_len,
            "precision": m.precision,
            "target": m.target,
            "dir": f"{STATE}/{MODEL_SUBDIR}",
        },
        # padding follows exact lengths only (the gpu engine, which estimates them, does not pad)
        "settings": {
            **_batch_settings(cfg),
            "padding_ratio": round(plan.padding_ratio(), 4) if lengths == "exact" else None,
        },
        "scan": {
            "seconds": round(scan.seconds, 3),
            "quarantined": len(scan.q_rows),
            "repaired": scan.n_repaired,
            "lengths": lengths,
            # estimated lengths cannot tell truncation; the manifest counts it from the parts either way
            "truncated": scan.n_truncated if lengths == "exact" else None,
        },
    }
    if scan.doc_row is not None:
        info["scan"].update(documents=scan.n_docs, chunks=scan.n_rows)  # type: ignore[attr-defined]
    info.update(extra or {})
    OutputDir.write_atomic(
        out.state(JOB_FILE), lambda p: p.write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
    )
    return Job(job_id, info, scan, plan, False)


def register_job(
    ctx: JobContext, client: redis.Redis, plan: Plan | None, tokenizer_json: str
) -> tuple[JobState, dict[int, tuple[int, int, int]]]:
    """The job's Redis state, with the batches already committed in the folder marked done (``plan`` None:
    still being planned; every committed part of this job counts)."""
    job_id, out, corpus, meta = ctx.job_id, ctx.out, ctx.corpus, ctx.meta
    state = JobState(client, job_id)
    before, done_before = state.meta(), state.done()  # read before the folder: a part commits before its mark
    committed = committed_parts(out, job_id, plan.n_batches if plan is not None else None)
    stale = done_before - set(committed)
    other = before.get("out")
    if stale and other and other != str(out) and state.running():
        raise InputError(
            f"job {job_id} (the same corpus, model and batch settings) is being embedded into "
            f"{other} through this broker right now: wait until it finishes, or change a batch "
            "setting (e.g. --batch-tokens) to make this a separate job"
        )
    state.create(
        {
            "n_batches": plan.n_batches if plan is not None else 0,
            "planned_rows": plan.n_rows if plan is not None else 0,
            "out": str(out),
            "model": meta.fingerprint,
            "max_seq_len": meta.max_seq_len,
            "corpus": corpus.uri,
        },
        tokenizer_json,
    )
    if stale:
        logger.warning(
            "job %s: Redis held %d batches as done that %s does not hold (the same job sent to another "
            "folder, or parts deleted): they are embedded again",
            job_id,
            len(stale),
            out,
        )
        state.forget_progress()
    new = state.reconcile(committed)
    if new:
        logger.info("job %s: %d batches already committed in %s", job_id, new, out)
    return state, committed
