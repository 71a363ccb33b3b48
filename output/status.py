"""`fbas-pipeline status`: a job's progress from its output folder and, with a broker, from Redis."""

from __future__ import annotations

from typing import Any


from core.redact import redact_url
from workers.jobstate import JobState, connect, list_jobs

__all__ = ["job_status"]


def job_status(out: str | None, broker: str | None) -> dict[str, Any]:
    """What `fbas-pipeline status` shows: the output folder's view (job.json, committed parts, manifest)
    and, with a broker, Redis's view of the folder's job (or of every job it knows)."""
    import json
    from pathlib import Path

    info: dict[str, Any] = {"lines": []}
    lines: list[str] = info["lines"]
    job_id = None
    if out:
        from core.layout import JOB_FILE, MANIFEST, PENDING_FILE
        from output.check import committed_parts
        from core.layout import OutputDir

        od = OutputDir(out)
        jp = od.state(JOB_FILE)
        if jp.exists():
            job = json.loads(jp.read_text(encoding="utf-8"))
            job_id = job["job"]
            parts = committed_parts(od, job_id, int(job["n_batches"]))
            rows = sum(d for d, _, _ in parts.values())
            quarantined = sum(q for _, _, q in parts.values()) + int(job.get("scan", {}).get("quarantined", 0))
            info["folder"] = {"job": job_id, "planned_batches": job["n_batches"], "done_batches": len(parts),
                              "embedded": rows, "quarantined": quarantined,
                              "finished": Path(od.path(MANIFEST)).exists()}
            f = info["folder"]
            lines.append(f"job {job_id} in {od}: {f['done_batches']}/{f['planned_batches']} batches committed, "
                         f"{rows} rows embedded, {quarantined} quarantined"
                         f"{', finalized' if f['finished'] else ''}")
        elif od.state(PENDING_FILE).exists():
            job_id = json.loads(od.state(PENDING_FILE).read_text(encoding="utf-8")).get("job")
            n = len(committed_parts(od, job_id, None))
            lines.append(f"job {job_id} in {od}: {n} batches committed; its scan is running (job.json is written "
                         "after the last window), or it stopped before that: rerunning the same ingest continues it")
        else:
            lines.append(f"{od}: no fbas job here")
    if broker:
        client = connect(broker)
        try:
            from workers.app import QUEUE

            ids = [job_id] if job_id else list(list_jobs(client))
            info["queue_length"] = int(client.llen(QUEUE))
            info["jobs"] = {}
            for j in ids:
                st = JobState(client, j)
                meta = st.meta()
                if not meta:
                    lines.append(f"job {j}: not in Redis at {redact_url(broker)} (finished and cleaned, or Redis "
                                 "restarted)")
                    continue
                c = st.counters()
                entry = {"planned": int(meta.get("n_batches", 0)), "done": st.n_done(), "counters": c,
                         "running": st.running(), "errors": st.errors()}
                info["jobs"][j] = entry
                lines.append(f"job {j}: {entry['done']}/{entry['planned']} batches done, {c['docs']} docs, "
                             f"{c['quarantined']} quarantined, {c['redelivered']} redelivered, {c['retries']} "
                             f"retries, {len(entry['running'])} running")
                lines.extend(f"  error: {e}" for e in entry["errors"][:3])
            lines.append(f"queue: {info['queue_length']} batches waiting")
        finally:
            client.close()
    if not out and not broker:
        lines.append("give an output folder or --broker")
    return info
