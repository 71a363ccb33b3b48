"""The producer: turn planned batches into task messages and enqueue them with backpressure.

``window_messages`` builds a new job's batches from the window the scan has just read (no second
read). ``batch_messages`` serves a resumed job: it reads the corpus in order and files each row
into its planned batch; a batch is sent the moment its last row has been read, so only the
open batches are in memory (see ``pipeline.ingest.plan``). Batches already committed (``skip``) are
not assembled.

``Sender.send`` publishes one Celery task per batch (msgpack) but first waits while the
queue holds ``queue_depth`` batches or more: Redis holds at most ``queue_depth`` messages of
the job (plus one per busy worker process), whatever the corpus size. A typical message of
512 short texts is 30-60 KB, so the default depth of 64 bounds the queue to a few MB.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from core.errors import InputError, ServerUnavailableError
from core.formats import Plan
from core.rowfile import release
from pipeline.ingest.read import Corpus
from workers.signing import CHUNKED_VERSION, MESSAGE_VERSION, sign

logger = logging.getLogger(__name__)

__all__ = ["batch_messages", "window_messages", "task_message", "Sender", "queue_length"]


def batch_messages(
    corpus: Corpus,
    plan: Plan,
    *,
    job: str,
    out: str,
    model: str,
    dim: int,
    skip: set[int] | frozenset[int] = frozenset(),
) -> Iterator[dict]:
    """Task messages (see ``workers.task``) for every planned batch not in ``skip``, in completion order."""
    todo = np.ones(plan.n_batches, dtype=bool)
    if skip:
        todo[np.fromiter(skip, dtype=np.int64)] = False
    if not todo.any():
        return
    need = plan.sizes()
    wanted = np.flatnonzero(todo)
    # each wanted batch's lowest and highest row: a record batch of the corpus looks only at the batches that reach
    # into it (its plan window's), rather than at an array of every row's batch
    first, last = _batch_spans(plan, wanted)
    # batches follow their windows: no batch before ``reach``'s index ends at or past a row, and none from
    # ``begins``'s index starts before one, so each record batch searches only the batches between
    reach = np.maximum.accumulate(last)
    begins = np.minimum.accumulate(first[::-1])[::-1]
    left = len(wanted)
    pending: dict[int, tuple[list, list, list, list]] = {}
    # read only the files and row groups holding them
    for rb in corpus.batches(start=int(first.min()), stop=int(last.max()) + 1):
        n = len(rb)
        b = np.full(n, -1, dtype=np.int64)
        lo = int(np.searchsorted(reach, rb.row0))
        near = slice(lo, max(lo, int(np.searchsorted(begins, rb.row0 + n))))
        for bi in wanted[near][(first[near] < rb.row0 + n) & (last[near] >= rb.row0)].tolist():
            planned = plan.rows(bi)
            b[planned[(planned >= rb.row0) & (planned < rb.row0 + n)] - rb.row0] = bi
            release(planned)
        pos = np.flatnonzero(b >= 0)
        if not len(pos):
            continue
        bs = b[pos]
        order = np.argsort(bs, kind="stable")  # group by batch, row order kept inside a group
        pos, bs = pos[order], bs[order]
        cuts = np.flatnonzero(np.diff(bs)) + 1
        for start, end in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [len(bs)]]).tolist()):
            bi = int(bs[start])
            rows, ids, texts, rep = pending.setdefault(bi, ([], [], [], []))
            for i in pos[start:end].tolist():
                rows.append(rb.row0 + i)
                ids.append(rb.ids[i])
                texts.append(rb.texts[i])
                if rb.repaired[i]:
                    rep.append(len(rows) - 1)
            if len(rows) == need[bi]:
                del pending[bi]
                left -= 1
                yield task_message(
                    job=job,
                    batch=bi,
                    out=out,
                    model=model,
                    dim=dim,
                    id_type=corpus.id_type,
                    row_ids=rows,
                    ids=ids,
                    texts=texts,
                    repaired=rep,
                )
        if not left:  # every wanted batch went out: the rest of the corpus need not be read
            return
    if pending:  # the corpus changed between the scan and now
        missing = sorted(pending)[:5]
        raise InputError(
            f"batches {missing} never completed while reading {corpus.uri}: the corpus changed since it "
            "was scanned; do not modify a corpus during an ingest, then rerun"
        )


def _batch_spans(plan: Plan, batches: np.ndarray, step: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest row of each of ``batches`` (a batch's rows ascend), read ``step`` batches at a time
    from the plan's row order (mapped: its pages are handed back as it goes)."""
    first, last = np.empty(len(batches), np.int64), np.empty(len(batches), np.int64)
    for s in range(0, len(batches), step):
        bs = batches[s : s + step]
        first[s : s + len(bs)] = plan.order[plan.offsets[bs]]
        last[s : s + len(bs)] = plan.order[plan.offsets[bs + 1] - 1]
        release(plan.order[int(plan.offsets[bs[0]]) : int(plan.offsets[bs[-1] + 1])])
    return first, last


def task_message(
    *,
    job: str,
    batch: int,
    out: str,
    model: str,
    dim: int,
    id_type: str,
    row_ids: list[int],
    ids: list,
    texts: list[str],
    repaired: list[int],
    chunks: dict[str, list[int]] | None = None,
) -> dict:
    """One batch task (``workers.task``): rows in ascending order; ``repaired``: positions in the batch;
    ``chunks``: a chunked job's per-row columns (``core.formats.CHUNK_FIELDS``; message version
    ``CHUNKED_VERSION``, which a worker without chunking refuses)."""
    msg: dict[str, object] = {
        "v": MESSAGE_VERSION if chunks is None else CHUNKED_VERSION,
        "job": job,
        "batch": batch,
        "out": out,
        "model": model,
        "dim": dim,
        "id_type": id_type,
        "row_ids": row_ids,
        "ids": ids,
        "texts": texts,
        "repaired": repaired,
    }
    if chunks is not None:
        msg["chunks"] = chunks
    return msg


def window_messages(
    window,
    plan,
    first_batch: int,
    *,
    job: str,
    out: str,
    model: str,
    dim: int,
    id_type: str,
    skip: set[int] | frozenset[int] = frozenset(),
) -> Iterator[dict]:
    """Task messages for one scanned window's planned batches (``plan``: its batches, global row ids;
    batch ``i`` of it is job batch ``first_batch + i``), built from the rows the scan holds."""
    for i in range(plan.n_batches):
        if first_batch + i in skip:
            continue
        rows = plan.rows(i)
        local = (rows - window.row0).tolist()
        yield task_message(
            job=job,
            batch=first_batch + i,
            out=out,
            model=model,
            dim=dim,
            id_type=id_type,
            row_ids=rows.tolist(),
            ids=[window.ids[j] for j in local],
            texts=[window.texts[j] for j in local],
            repaired=[k for k, j in enumerate(local) if window.repaired[j]],
            chunks=window.chunks.take(rows - window.row0).to_lists() if window.chunks is not None else None,
        )


def queue_length(client: Any, queue: str) -> int:
    """Messages waiting in a kombu Redis queue (the list named after the queue)."""
    import redis

    try:
        return int(client.llen(queue))
    except redis.RedisError as e:
        raise ServerUnavailableError(f"Redis error while reading the queue length: {type(e).__name__}") from None


class Sender:
    """Publishes batch tasks, never letting the queue grow past ``depth`` messages."""

    def __init__(
        self,
        app: Any,
        client: Any,
        queue: str,
        depth: int,
        task_name: str,
        on_wait: Callable[[], object] | None = None,
        poll_s: float = 0.05,
        key: str | None = None,
    ) -> None:
        self.app, self.client, self.queue, self.depth = app, client, queue, max(1, depth)
        self.key = key  # the fleet's task key: every message is signed with it (workers.signing)
        self.task_name, self.on_wait, self.poll_s = task_name, on_wait, poll_s
        self.sent = 0
        self.waited_s = 0.0

    def send(self, msg: dict) -> None:
        """Wait for room (calling ``on_wait`` between polls), then publish ``msg``."""
        t0 = time.monotonic()
        while queue_length(self.client, self.queue) >= self.depth:
            if self.on_wait:
                self.on_wait()
            time.sleep(self.poll_s)
        self.waited_s += time.monotonic() - t0
        if self.key:
            sign(msg, self.key)
        try:
            self.app.send_task(
                self.task_name,
                args=[msg],
                queue=self.queue,
                serializer="msgpack",
                ignore_result=True,
                retry=True,
                retry_policy={"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3},
            )
        except Exception as e:  # noqa: BLE001 - kombu/redis boundary: any publish failure is a broker fault
            raise ServerUnavailableError(f"could not enqueue batch {msg.get('batch')}: {type(e).__name__}") from None
        self.sent += 1
        if self.on_wait:
            self.on_wait()
