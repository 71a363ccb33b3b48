"""`fbas-pipeline status`: a job's progress from its output folder and, with a broker, from Redis."""

from __future__ import annotations

import json
from typing import Any

from core.formatting import clock
from core.layout import JOB_FILE, MANIFEST, PENDING_FILE, OutputDir
from core.redact import redact_url
from output.check import committed_parts
from workers.jobstate import JobState, alive_workers, connect, list_jobs

__all__ = ["job_status"]


def job_status(out: str | None, broker: str | None) -> dict[str, Any]:
    """What `fbas-pipeline status` shows: the output folder's view (job.json, committed parts, manifest)
    and, with a broker, Redis's view of the folder's job (or of every job it knows). ``lines`` holds the
    text form."""
    info: dict[str, Any] = {"lines": []}
    job_id = _folder_status(OutputDir(out), info) if out else None
    if broker:
        _broker_status(broker, job_id, info)
    if not out and not broker:
        info["lines"].append("give an output folder or --broker")
    return info


def _folder_status(od: OutputDir, info: dict[str, Any]) -> str | None:
    """The folder's job (``info["folder"]``) and its line; returns the job id, if the folder has a job."""
    lines: list[str] = info["lines"]
    jp = od.state(JOB_FILE)
    if jp.exists():
        job = json.loads(jp.read_text(encoding="utf-8"))
        job_id = job["job"]
        parts = committed_parts(od, job_id, int(job["n_batches"]))
        rows = sum(d for d, _, _ in parts.values())
        quarantined = sum(q for _, _, q in parts.values()) + int(job.get("scan", {}).get("quarantined", 0))
        f = info["folder"] = {
            "job": job_id,
            "planned_batches": job["n_batches"],
            "done_batches": len(parts),
            "embedded": rows,
            "quarantined": quarantined,
            "finished": od.path(MANIFEST).exists(),
        }
        unit = "rows"
        if "chunk" in job.get("settings", {}):  # a chunked job: its rows are chunks
            unit = "chunks"
            f["chunk"], f["documents"] = job["settings"]["chunk"], job.get("scan", {}).get("documents")
        lines.append(
            f"job {job_id} in {od}: {f['done_batches']}/{f['planned_batches']} batches committed, "
            f"{rows} {unit} embedded, {quarantined} quarantined"
            f"{', finalized' if f['finished'] else ''}"
        )
        return job_id
    if od.state(PENDING_FILE).exists():
        job_id = json.loads(od.state(PENDING_FILE).read_text(encoding="utf-8")).get("job")
        n = len(committed_parts(od, job_id, None))
        lines.append(
            f"job {job_id} in {od}: {n} batches committed; its scan is running (job.json is written "
            "after the last window), or it stopped before that: rerunning the same ingest continues it"
        )
        return job_id
    lines.append(f"{od}: no fbas job here")
    return None


def _broker_status(broker: str, job_id: str | None, info: dict[str, Any]) -> None:
    """Redis's view (``info["jobs"]``, ``info["queue_length"]``) of ``job_id``, or of every job it knows."""
    from workers.app import QUEUE

    lines: list[str] = info["lines"]
    client = connect(broker)
    try:
        ids = [job_id] if job_id else list(list_jobs(client))
        info["queue_length"] = int(client.llen(QUEUE))
        info["jobs"] = {}
        for j in ids:
            st = JobState(client, j)
            meta = st.meta()
            if not meta:
                lines.append(
                    f"job {j}: not in Redis at {redact_url(broker)} (finished and cleaned, or Redis restarted)"
                )
                continue
            c = st.counters()
            entry = {
                "planned": int(meta.get("n_batches", 0)),
                "done": st.n_done(),
                "counters": c,
                "running": st.running(),
                "gone": st.orphans(),
                "warnings": [m for _, m in st.warnings()][-3:],
                "errors": st.errors(),
            }
            info["jobs"][j] = entry
            lines.append(
                f"job {j}: {entry['done']}/{entry['planned']} batches done, {c['docs']} docs, "
                f"{c['quarantined']} quarantined, {c['redelivered']} redelivered, {c['retries']} "
                f"retries, {len(entry['running']) - len(entry['gone'])} running"
            )
            if entry["gone"]:
                lost = ", ".join(f"{b} ({w})" for b, w in sorted(entry["gone"].items())[:5])
                lines.append(
                    f"  {len(entry['gone'])} batches were taken by workers that are gone (no heartbeat): {lost}; "
                    "a running producer sends them again, else the broker does after the visibility timeout"
                )
            entry["workers"] = _workers(st, client, entry["running"])
            lines.extend(_worker_lines(entry["workers"]))
            progress = _progress(meta, c, entry["workers"])
            if progress:
                entry["progress"] = progress
                lines.append(
                    f"  progress: {progress['rows_done']:,}/{progress['planned_rows']:,} rows, "
                    f"{progress['docs_per_s']:,.0f} docs/s, ETA {clock(progress['eta_s'])}"
                )
            lines.extend(f"  error: {e}" for e in entry["errors"][:3])
            lines.extend(f"  a worker reported: {w}" for w in entry["warnings"])
        lines.append(f"queue: {info['queue_length']} batches waiting")
    finally:
        client.close()


def _workers(st: JobState, client: Any, running: dict[int, str]) -> dict[str, dict[str, Any]]:
    """Per worker process (host:pid) that committed or runs a batch of the job: docs, batches, docs/s between
    its first and last commit, whether it still sends heartbeats, and the batches it runs now."""
    stats = st.workers()
    wheres = set(stats) | set(running.values())
    alive = alive_workers(client, wheres)
    out: dict[str, dict[str, Any]] = {}
    for w in sorted(wheres):
        s = stats.get(w, {})
        span, docs, batches = s.get("last", 0.0) - s.get("first", 0.0), s.get("docs", 0.0), s.get("batches", 0.0)
        # the first commit opens the span: the docs after it over the span (an average batch's docs left out)
        rate = docs * (batches - 1) / batches / span if span > 0 and batches > 1 else None
        out[w] = {
            "docs": int(docs),
            "batches": int(batches),
            "docs_per_s": round(rate, 1) if rate else None,
            "alive": w in alive,
            "running": sorted(b for b, where in running.items() if where == w),
        }
    return out


def _worker_lines(workers: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for w, s in workers.items():
        rate = f", {s['docs_per_s']:,.0f} docs/s" if s["docs_per_s"] else ""
        now = f", running batch {', '.join(map(str, s['running']))}" if s["running"] else ""
        lines.append(
            f"  worker {w}: {s['docs']:,} docs in {s['batches']} batches{rate}, "
            f"{'alive' if s['alive'] else 'gone (no heartbeat)'}{now}"
        )
    return lines


def _progress(meta: dict[str, str], counters: dict[str, int], workers: dict[str, dict[str, Any]]) -> dict | None:
    """Rows done of the planned rows, the fleet's docs/s (the live workers' rates added up) and the ETA."""
    planned = int(meta.get("planned_rows", 0) or 0)
    rate = sum(s["docs_per_s"] or 0 for s in workers.values() if s["alive"])
    if not planned or not rate:
        return None
    done = counters["docs"] + counters["quarantined"]
    return {"rows_done": done, "planned_rows": planned, "docs_per_s": rate, "eta_s": max(0, planned - done) / rate}
