"""Job state in Redis, namespaced by job id (a fingerprint of corpus + model + settings).

    fbas:jobs                       set of job ids this Redis knows (for `fbas-pipeline status`)
    fbas:job:<id>:meta              hash: planned batches/rows, out, model fingerprint, max_seq_len, created
    fbas:job:<id>:tokenizer         string: the model's tokenizer.json (workers need nothing but broker + Triton)
    fbas:job:<id>:done              set of finished batch indices (parts committed)
    fbas:job:<id>:counters          hash: docs, tokens, quarantined, redelivered, retries (batches done once each)
    fbas:job:<id>:attempts          hash: batch -> deliveries started (bounds poison batches)
    fbas:job:<id>:running           hash: batch -> "host:pid" of the worker child that runs it now
    fbas:job:<id>:errors            list: job-level errors workers report (e.g. wrong model behind Triton)

Counters move only when a batch enters ``done`` for the first time (one Lua script), so a
batch delivered twice is counted once. Redis is a cache of progress, not the source of
truth: the committed parts in the output folder are; ``reconcile`` rebuilds ``done`` from
them after Redis lost its data. This module is the Redis boundary: redis-py errors leave it
as ``ServerUnavailableError``, and no URL with a password is ever logged.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from typing import Any

from core.errors import ServerUnavailableError
from core.redact import redact, redact_url

logger = logging.getLogger(__name__)

__all__ = [
    "JobState",
    "connect",
    "connect_lazy",
    "redact_url",
    "list_jobs",
    "ping",
    "ping_error",
    "queued_batches",
    "heartbeat",
    "alive_workers",
    "ALIVE_PREFIX",
]

PREFIX = "fbas:job:"
JOBS_KEY = "fbas:jobs"
COUNTERS = ("docs", "tokens", "quarantined", "redelivered", "retries")

_MARK_DONE = """
local where = redis.call('HGET', KEYS[3], ARGV[1])
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'docs', ARGV[2])
  redis.call('HINCRBY', KEYS[2], 'tokens', ARGV[3])
  redis.call('HINCRBY', KEYS[2], 'quarantined', ARGV[4])
  if where and ARGV[5] then
    redis.call('HINCRBY', KEYS[4], where .. '|docs', ARGV[2])
    redis.call('HINCRBY', KEYS[4], where .. '|batches', 1)
    redis.call('HSETNX', KEYS[4], where .. '|first', ARGV[5])
    redis.call('HSET', KEYS[4], where .. '|last', ARGV[5])
  end
  redis.call('HDEL', KEYS[3], ARGV[1])
  return 1
end
redis.call('HDEL', KEYS[3], ARGV[1])
return 0
"""


def connect(url: str, timeout: float = 10.0):
    """A redis-py client for a ``redis://`` / ``rediss://`` / ``unix://`` URL, checked with PING."""
    import redis

    try:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30, retry_on_timeout=True
        )
        client.ping()
    except redis.AuthenticationError:
        raise ServerUnavailableError(
            f"Redis at {redact_url(url)} refused the credentials: check the user and password in --broker"
        ) from None
    except redis.RedisError as e:
        detail = redact(str(e), url)
        tls = re.search(
            r"\[SSL[^\]]*\][^\n]*|certificate verify failed[^\n]*|wrong version number|handshake[^\n]*", detail
        )
        if tls:
            raise ServerUnavailableError(
                f"TLS with Redis at {redact_url(url)} failed: {tls[0].strip().rstrip('.')}. Check the server's "
                "certificate and the CA you trust (?ssl_ca_certs=/path/ca.pem in the URL), or use redis:// for a "
                "server without TLS"
            ) from None
        raise ServerUnavailableError(
            f"Redis at {redact_url(url)} is not reachable ({type(e).__name__}: {detail}): start it or check --broker"
        ) from None
    return client


def connect_lazy(url: str, timeout: float = 10.0):
    """A redis-py client for ``url`` that connects on first use (no PING now: the broker may be down)."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def _guard(fn):
    """Translate redis-py errors into ServerUnavailableError (this module is the boundary)."""
    import functools

    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        import redis

        try:
            return fn(self, *a, **kw)
        except redis.RedisError as e:
            raise ServerUnavailableError(
                f"Redis error in job {self.job_id}: {type(e).__name__}: {redact(str(e))}"
            ) from None

    return wrapper


class JobState:
    """One job's keys in Redis."""

    def __init__(self, client: Any, job_id: str) -> None:
        self.r, self.job_id = client, job_id
        base = PREFIX + job_id
        self.k_meta, self.k_tok, self.k_done = base + ":meta", base + ":tokenizer", base + ":done"
        self.k_counters, self.k_attempts = base + ":counters", base + ":attempts"
        self.k_running, self.k_errors = base + ":running", base + ":errors"
        self.k_warnings = base + ":warnings"
        self.k_workers = base + ":workers"  # "host:pid|docs|batches|first|last": what each worker committed
        self.k_crashes = base + ":crashes"  # batch -> deliveries that died unfinished (bounds poison batches)
        self._mark = client.register_script(_MARK_DONE)

    # -- producer side
    @_guard
    def create(self, meta: dict[str, Any], tokenizer_json: str) -> None:
        """Write (or refresh) the job's metadata and tokenizer; keeps progress already recorded."""
        p = self.r.pipeline()
        p.hset(self.k_meta, mapping={k: str(v) for k, v in meta.items()})
        p.hsetnx(self.k_meta, "created", str(time.time()))
        p.set(self.k_tok, tokenizer_json)
        p.sadd(JOBS_KEY, self.job_id)
        p.delete(self.k_errors)
        p.execute()

    @_guard
    def set_planned(self, n_batches: int, n_rows: int) -> None:
        """The batches and rows planned so far (a new job is planned window by window)."""
        self.r.hset(self.k_meta, mapping={"n_batches": str(n_batches), "planned_rows": str(n_rows)})

    @_guard
    def exists(self) -> bool:
        return bool(self.r.exists(self.k_meta)) and bool(self.r.exists(self.k_tok))

    @_guard
    def forget_progress(self) -> None:
        """Drop the job's progress (done batches, counters, attempts, running batches): used when Redis
        holds batches as done that the output folder lacks (the same job sent to another folder, or parts
        deleted); the producer skips done batches, so those would never be embedded into this folder."""
        self.r.delete(self.k_done, self.k_counters, self.k_running, self.k_attempts, self.k_workers, self.k_crashes)

    @_guard
    def reconcile(self, committed: dict[int, tuple[int, int, int]]) -> int:
        """Mark batches found committed in the output folder as done: ``{batch: (docs, tokens, quarantined)}``.
        Returns how many were new to Redis."""
        new = 0
        items = list(committed.items())
        for start in range(0, len(items), 1000):
            p = self.r.pipeline(transaction=False)
            for batch, (docs, tokens, quarantined) in items[start : start + 1000]:
                self._mark(
                    keys=[self.k_done, self.k_counters, self.k_running, self.k_workers],
                    args=[batch, docs, tokens, quarantined],
                    client=p,
                )
            new += sum(int(x) for x in p.execute())
        return new

    @_guard
    def done(self) -> set[int]:
        return {int(x) for x in self.r.smembers(self.k_done)}

    @_guard
    def n_done(self) -> int:
        return int(self.r.scard(self.k_done))

    @_guard
    def counters(self) -> dict[str, int]:
        raw = self.r.hgetall(self.k_counters)
        return {c: int(raw.get(c.encode(), 0)) for c in COUNTERS}

    @_guard
    def meta(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.k_meta).items()}

    @_guard
    def errors(self) -> list[str]:
        return [e.decode("utf-8", "replace") for e in self.r.lrange(self.k_errors, 0, 20)]

    @_guard
    def orphans(self) -> dict[int, str]:
        """Running batches whose worker process sent no heartbeat lately (killed, or its host lost): ``{batch:
        host:pid}``. Their messages come back only after the visibility timeout; a producer sends them again."""
        running = self.running()
        alive = alive_workers(self.r, set(running.values()))
        return {b: w for b, w in running.items() if w not in alive}

    @_guard
    def forget_running(self, batch: int) -> None:
        self.r.hdel(self.k_running, str(batch))

    @_guard
    def running(self) -> dict[int, str]:
        return {int(k): v.decode() for k, v in self.r.hgetall(self.k_running).items()}

    # -- worker side
    @_guard
    def tokenizer_json(self) -> str | None:
        raw = self.r.get(self.k_tok)
        return raw.decode("utf-8") if raw is not None else None

    @_guard
    def begin(self, batch: int, where: str) -> tuple[int, int]:
        """Record that a delivery of ``batch`` starts on ``where`` (host:pid); return (its attempt number, 1 = first;
        how many earlier deliveries died unfinished). A delivery died when the next one finds it still running on
        a worker process that is gone (this host: its pid; another host: no heartbeat): a second copy of a batch
        sent while its first worker lives (a producer's re-send, a broker's redelivery) is not a crash."""
        prev = self.r.hget(self.k_running, str(batch))
        died = prev is not None and prev.decode() != where and _gone(self.r, prev.decode())
        p = self.r.pipeline()
        p.hincrby(self.k_attempts, str(batch), 1)
        p.hset(self.k_running, str(batch), where)
        p.hincrby(self.k_crashes, str(batch), 1 if died else 0)
        attempt, _, crashes = p.execute()
        return int(attempt), int(crashes)

    @_guard
    def is_done(self, batch: int) -> bool:
        return bool(self.r.sismember(self.k_done, batch))

    @_guard
    def mark_done(self, batch: int, docs: int, tokens: int, quarantined: int) -> bool:
        """Commit ``batch`` as done; counters move only the first time. True if it was new."""
        return bool(
            self._mark(
                keys=[self.k_done, self.k_counters, self.k_running, self.k_workers],
                args=[batch, docs, tokens, quarantined, f"{time.time():.3f}"],
            )
        )

    @_guard
    def count(self, name: str, n: int = 1) -> None:
        self.r.hincrby(self.k_counters, name, n)

    @_guard
    def report_error(self, message: str) -> None:
        p = self.r.pipeline()
        p.lpush(self.k_errors, message)
        p.ltrim(self.k_errors, 0, 99)
        p.execute()

    @_guard
    def workers(self) -> dict[str, dict[str, float]]:
        """Per worker process (host:pid): docs and batches it committed, and when its first and last commit
        were (epoch seconds)."""
        out: dict[str, dict[str, float]] = {}
        for k, v in self.r.hgetall(self.k_workers).items():
            where, _, field = k.decode().rpartition("|")
            out.setdefault(where, {})[field] = float(v)
        return out

    @_guard
    def report_warning(self, message: str) -> None:
        """A passing trouble a worker met (Triton unreachable, a retry): the producer relays it, status shows it."""
        p = self.r.pipeline()
        p.lpush(self.k_warnings, f"{time.time():.3f} {message}")
        p.ltrim(self.k_warnings, 0, 49)
        p.execute()

    @_guard
    def warnings(self, since: float = 0.0) -> list[tuple[float, str]]:
        """(time, message) of the warnings reported after ``since``, oldest first."""
        out = []
        for raw in self.r.lrange(self.k_warnings, 0, 49):
            stamp, _, msg = raw.decode("utf-8", "replace").partition(" ")
            try:
                t = float(stamp)
            except ValueError:
                continue
            if t > since:
                out.append((t, msg))
        return sorted(out)

    @_guard
    def delete(self) -> None:
        self.r.delete(
            self.k_meta,
            self.k_tok,
            self.k_done,
            self.k_counters,
            self.k_attempts,
            self.k_running,
            self.k_errors,
            self.k_warnings,
            self.k_workers,
            self.k_crashes,
        )
        self.r.srem(JOBS_KEY, self.job_id)


ALIVE_PREFIX = "fbas:alive:"  # + "host:pid": a worker process's heartbeat (expires unless renewed)


def heartbeat(client: Any, where: str, ttl: float) -> None:
    """Say that worker process ``where`` (host:pid) is alive for the next ``ttl`` seconds."""
    import redis

    try:
        client.set(ALIVE_PREFIX + where, "1", px=int(ttl * 1000))
    except redis.RedisError as e:
        raise ServerUnavailableError(f"Redis error while sending a heartbeat: {type(e).__name__}") from None


def alive_workers(client: Any, wheres: Iterable[str]) -> set[str]:
    """Which of the worker processes ``wheres`` (host:pid) sent a heartbeat recently."""
    import redis

    wheres = list(wheres)
    if not wheres:
        return set()
    try:
        p = client.pipeline(transaction=False)
        for w in wheres:
            p.exists(ALIVE_PREFIX + w)
        return {w for w, ok in zip(wheres, p.execute()) if ok}
    except redis.RedisError as e:
        raise ServerUnavailableError(f"Redis error while reading heartbeats: {type(e).__name__}") from None


def _gone(client: Any, where: str) -> bool:
    """Whether worker process ``where`` (host:pid) no longer runs: on this host, by its pid (exact); elsewhere,
    by its heartbeat having expired."""
    import socket

    from core.processes import pid_alive

    host, _, pid = where.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return not pid_alive(int(pid))
    return not client.exists(ALIVE_PREFIX + where)


def list_jobs(client: Any) -> Iterable[str]:
    """Job ids this Redis holds state for."""
    import redis

    try:
        return sorted(j.decode() for j in client.smembers(JOBS_KEY))
    except redis.RedisError as e:
        raise ServerUnavailableError(f"Redis error: {type(e).__name__}") from None


def ping(client: Any) -> bool:
    """Whether the broker answers now."""
    return ping_error(client) is None


def ping_error(client: Any) -> str | None:
    """None when the broker answers now; else ``"timeout"`` (it is slow: busy, or a network blip) or
    ``"connection"`` (refused or dropped: it went away, or restarted)."""
    import redis

    try:
        client.ping()
        return None
    except redis.TimeoutError:
        return "timeout"
    except redis.RedisError:
        return "connection"


def server_id(client: Any) -> str | None:
    """The broker's identity for this start: Redis's ``run_id`` (``INFO server``), new each time it starts; None
    when it does not answer or has none."""
    import redis

    try:
        return str(client.info("server").get("run_id") or "") or None
    except redis.RedisError:
        return None


def queued_batches(client: Any, queue: str, job_id: str, unacked: bool = True) -> set[int]:
    """Batches of ``job_id`` that the broker holds as messages: waiting in ``queue``, or delivered to a worker
    and not acknowledged yet (kombu's ``unacked`` hash, redelivered after ``visibility_timeout``; left out with
    ``unacked`` False). After a
    broker outage, the batches the job still needs minus these are the ones the outage lost."""
    import redis

    try:
        waiting = client.lrange(queue, 0, -1)
        taken = client.hvals("unacked") if unacked else []
    except redis.RedisError as e:
        raise ServerUnavailableError(f"Redis error while reading queue {queue!r}: {type(e).__name__}") from None
    found: set[int] = set()
    for raw in waiting:
        _add_batch(found, raw, job_id)
    for raw in taken:  # [message, exchange, routing_key]
        try:
            _add_batch(found, json.dumps(json.loads(raw)[0]), job_id)
        except (ValueError, TypeError, IndexError):
            continue
    return found


def _add_batch(found: set[int], raw: bytes | str, job_id: str) -> None:
    """Add the batch a kombu message (JSON envelope, msgpack or JSON Celery body) carries, if it is the job's."""
    import base64

    import msgpack

    try:
        env = json.loads(raw)
        body = env["body"]
        if env.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = msgpack.unpackb(body, raw=False) if "msgpack" in env.get("content-type", "") else json.loads(body)
        msg = args[0][0]  # Celery protocol 2: [args, kwargs, embed]; the task's one argument is the batch
        if isinstance(msg, dict) and msg.get("job") == job_id:
            found.add(int(msg["batch"]))
    except (ValueError, KeyError, TypeError, IndexError, msgpack.UnpackException):
        return
