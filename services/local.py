"""Local mode: a whole cluster on this machine, on free loopback ports, stopped on exit and on Ctrl-C.

    with LocalCluster(model_dir, state_dir, cfg) as c:     # redis-server + tritonserver + a Celery worker
        c.broker_url, c.triton_url
        c.wait_ready()                                      # Triton and the model are ready

* ``redis-server``: a temporary folder, AOF on (``appendfsync everysec``), no RDB snapshots,
  bound to 127.0.0.1, a random password (given in a 0600 config file, never on a command line
  or in a log).
* ``tritonserver``: ``services.triton.TritonProcess`` on a model repository written next to
  the Redis folder; launched from the main thread, its model's load is waited for on a helper
  thread so that the corpus scan overlaps it.
* one supervised Celery worker (``services.worker.CeleryWorker``) with ``concurrency`` processes,
  a task key of its own and ``OUT`` as the only folder it writes to.

Every child gets ``PR_SET_PDEATHSIG`` (it dies with this process even on ``kill -9``); their pids
are recorded in ``STATE/local-pids.json`` so that a later run reaps anything still left, and the
temporary folders of killed clusters are swept by the next local run. Logs go to ``STATE/logs/``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from core.config import FbasConfig
from core.envs import env_name
from core.errors import ConfigError, FbasError, ServerUnavailableError
from core.processes import kill_group, pid_alive
from services.worker import CeleryWorker, detach_dying_with_parent, pool_size

logger = logging.getLogger(__name__)

__all__ = ["LocalCluster", "RedisServer", "reap_stale", "sweep_dead_work_dirs"]

PIDS_FILE = "local-pids.json"


WORK_PREFIX = "fbas-local-"  # + "<pid>-<random>": a local cluster's temporary folder (Redis files, repository)


def sweep_dead_work_dirs() -> list[Path]:
    """Remove the temporary folders of local clusters whose process is gone (a ``kill -9`` leaves them),
    whatever output folder they served; returns them."""
    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}*-*"):
        pid = d.name[len(WORK_PREFIX) :].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if removed:
        logger.info("removed %d temporary folders of killed local clusters", len(removed))
    return removed


def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def reap_stale(state_dir: Path) -> int:
    """Kill the children a killed earlier run left behind (checked by pid start time); return how many."""
    p = state_dir / PIDS_FILE
    if not p.exists():
        return 0
    try:
        entries = json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        entries = []
    n = 0
    for e in entries:
        work = e.get("work")
        if work and Path(work).name.startswith(WORK_PREFIX) and Path(work).is_dir():
            shutil.rmtree(work, ignore_errors=True)  # the killed run's Redis AOF and model repository
            continue
        pid, started = int(e.get("pid", 0)), e.get("started")
        if pid > 1 and started and _proc_start_time(pid) == started:
            logger.warning("stopping %s (pid %d) left behind by an earlier run", e.get("name"), pid)
            kill_group(pid, signal.SIGKILL)
            n += 1
    p.unlink(missing_ok=True)
    return n


def free_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """A port free on ``host`` now and not in ``avoid`` (ports handed to a server that has not bound them yet)."""
    from services.triton import free_port as _fp

    while True:
        port = _fp(host)
        if port not in avoid:
            return port


class RedisServer:
    """``redis-server`` as a child: loopback, AOF on, random password, temporary folder."""

    def __init__(self, work_dir: Path, log_dir: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fbas-redis-", dir=work_dir))
        self.log_dir = log_dir
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        return self.launch().wait_ready()

    def launch(self) -> RedisServer:
        """Start the process on a free port without waiting for it (``wait_ready`` does)."""
        binary = shutil.which("redis-server")
        if not binary:
            raise ConfigError(
                "redis-server not found on PATH: install Redis 6+ (apt install redis-server) or pass "
                "--broker redis://HOST:PORT/0 to use a running one"
            )
        self.port = free_port()
        conf = self.dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(
                f"port {self.port}\nbind 127.0.0.1\nprotected-mode yes\ndir {self.dir}\n"
                f'appendonly yes\nappendfsync everysec\nsave ""\nrequirepass {self.password}\n'
                f"daemonize no\nloglevel warning\nlogfile {self.log_dir / 'redis.log'}\n"
            )
        self.proc = subprocess.Popen(
            [binary, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=detach_dying_with_parent,
        )
        return self

    def wait_ready(self) -> RedisServer:
        from workers.jobstate import connect

        assert self.proc is not None, "wait_ready() follows launch()"
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise ServerUnavailableError(
                    f"redis-server exited with code {self.proc.returncode} at start: see {self.log_dir / 'redis.log'}"
                )
            try:
                connect(self.url, timeout=1.0).close()
                break
            except ServerUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        logger.info("redis-server ready on 127.0.0.1:%d (pid %d, AOF in %s)", self.port, self.proc.pid, self.dir)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class LocalCluster:
    """Redis + Triton + a Celery worker for one ingest (see the module docstring)."""

    def __init__(
        self,
        model_dir: Path,
        state_dir: Path,
        cfg: FbasConfig,
        *,
        concurrency: int | None = None,
        worker_env: dict[str, str] | None = None,
        out_roots: list[Path] | None = None,
    ) -> None:
        """``state_dir``: ``OUT/.fbas/local`` of the job it serves; its worker writes only inside ``out_roots``
        (default: that OUT) and accepts only tasks signed with ``task_key`` (made here)."""
        self.model_dir, self.state_dir, self.cfg = Path(model_dir), Path(state_dir), cfg
        self.out_roots = [Path(r).resolve() for r in out_roots] if out_roots else [self.state_dir.resolve().parents[1]]
        self.task_key = secrets.token_hex(32)
        self.concurrency = concurrency or pool_size(cfg)
        self.worker_env = worker_env or {}
        self.log_dir = self.state_dir / "logs"
        self.redis: RedisServer | None = None
        self.triton: Any = None
        self.worker: CeleryWorker | None = None
        self._work: Path | None = None
        self._triton_thread: threading.Thread | None = None
        self._triton_error: BaseException | None = None
        self._stop_lock = threading.Lock()

    @property
    def broker_url(self) -> str:
        return self.redis.url  # type: ignore[union-attr]

    @property
    def triton_url(self) -> str:
        return self.triton.grpc_url

    def start(self) -> LocalCluster:
        from services.repository import ModelEntryOptions, write_model_repository
        from services.triton import TritonProcess

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        reap_stale(self.state_dir)
        sweep_dead_work_dirs()
        self._work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-"))
        try:
            # redis-server is launched, then tritonserver (seconds: the engine's imports, weights and kernels)
            # before Redis is waited for; every port is picked apart from the others, as neither server has
            # bound its own yet
            self.redis = RedisServer(self._work, self.log_dir).launch()
            repo = self._work / "models"
            opts = ModelEntryOptions.from_config(self.cfg)
            write_model_repository(self.model_dir, repo, options=opts)
            host, ports = "127.0.0.1", [self.redis.port]
            for _ in range(3):
                ports.append(free_port(host, avoid=ports))
            self.triton = TritonProcess(
                repo,
                model_name=opts.model_name,
                host=host,
                grpc_port=ports[1],
                http_port=ports[2],
                metrics_port=ports[3],
                ready_timeout=self.cfg.serve.ready_timeout,
                tritonserver=getattr(self.cfg.serve, "tritonserver", None),
                log_file=self.log_dir / "tritonserver.log",
            )
            # launched from this (the main) thread, which lives as long as the job: the server dies with it,
            # kill -9 included; the wait for its model runs on a thread, beside the scan
            self.triton.launch(die_with_parent=True)
            self._write_pids()
            self._triton_thread = threading.Thread(target=self._wait_triton, name="triton-start", daemon=True)
            self._triton_thread.start()
            self.redis.wait_ready()
            q = self.cfg.queue
            env = {
                env_name("broker"): self.broker_url,
                env_name("triton"): self.triton_url,
                env_name("model_name"): opts.model_name,
                env_name("ready_timeout"): str(self.cfg.serve.ready_timeout),
                env_name("max_retries"): str(q.max_retries),
                env_name("task_time_limit"): str(q.task_time_limit),
                env_name("visibility_timeout"): str(q.visibility_timeout),
                env_name("shared_memory"): str(bool(getattr(self.cfg.serve, "shared_memory", False))),
                env_name("task_key"): self.task_key,
                env_name("worker_metrics_port"): "0",  # a local job's worker lives as long as the job: no endpoint
                env_name("out_root"): ",".join(str(r) for r in self.out_roots),
            }
            self.worker = CeleryWorker(
                env, self.concurrency, self.log_dir / "worker.log", extra_env=self.worker_env
            ).start()
            self._write_pids()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_triton(self) -> None:
        try:
            self.triton.wait_started()
        except BaseException as e:  # noqa: BLE001 - handed to wait_ready in the main thread
            self._triton_error = e

    def _write_pids(self) -> None:
        entries = []
        for name, proc in (
            ("redis-server", self.redis and self.redis.proc),
            ("celery worker", self.worker and self.worker.proc),
        ):
            if proc:
                entries.append({"name": name, "pid": proc.pid, "started": _proc_start_time(proc.pid)})
        if self.triton is not None and self.triton.pid:
            entries.append(
                {"name": "tritonserver", "pid": self.triton.pid, "started": _proc_start_time(self.triton.pid)}
            )
        if self._work:
            entries.append({"name": "work", "work": str(self._work)})
        tmp = self.state_dir / (PIDS_FILE + ".tmp")
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(tmp, self.state_dir / PIDS_FILE)

    def pids(self) -> dict[str, int]:
        """Pids of the cluster's processes (for tests that kill them)."""
        out = {}
        if self.redis and self.redis.proc:
            out["redis"] = self.redis.proc.pid
        if self.triton is not None and self.triton.pid:
            out["triton"] = self.triton.pid
        if self.worker and self.worker.proc:
            out["worker"] = self.worker.proc.pid
        return out

    def engine_stats(self) -> dict[str, float]:
        """Triton's own account of the model's work so far (``TritonProcess.model_stats``)."""
        return self.triton.model_stats()

    def wait_ready(self) -> None:
        """Block until Triton serves the model; raise its start error (with its log tail) if it failed."""
        if self._triton_thread:
            self._triton_thread.join()
        if self._triton_error is not None:
            raise self._triton_error
        self.check()

    def check(self) -> None:
        """Raise ``ServerUnavailableError`` if a child process died."""
        if self.redis and self.redis.proc and self.redis.proc.poll() is not None:
            raise ServerUnavailableError(
                f"redis-server exited (code {self.redis.proc.returncode}): see {self.log_dir / 'redis.log'}"
            )
        if self.worker and self.worker.proc and not self.worker.alive():
            raise ServerUnavailableError(
                f"the celery worker exited (code {self.worker.proc.returncode}): see {self.log_dir / 'worker.log'}"
            )
        started = self._triton_thread is not None and not self._triton_thread.is_alive() and self._triton_error is None
        poll = getattr(self.triton, "poll", None)
        code = poll() if started and callable(poll) else None
        if code is not None:
            raise ServerUnavailableError(f"tritonserver exited (code {code}): see {self.log_dir / 'tritonserver.log'}")

    def stop(self, idle: bool = False) -> None:
        """Stop the worker (warm shutdown) and Triton at the same time, then Redis; remove the temporary
        folders. ``idle=True`` (the job is finished, nothing in flight) kills tritonserver instead of
        waiting for its slower graceful exit. Safe to call twice and from two threads."""
        with self._stop_lock:
            self._stop(idle)

    def stop_in_background(self) -> threading.Thread:
        """``stop(idle=True)`` in a thread (the caller finalizes meanwhile); ``stop()`` later waits for it."""
        t = threading.Thread(target=self.stop, kwargs={"idle": True}, name="local-cluster-stop")
        t.start()
        return t

    def _stop(self, idle: bool) -> None:
        errors: list[BaseException] = []

        def stop_worker() -> None:
            if self.worker:
                try:
                    self.worker.stop()
                except (OSError, FbasError) as e:
                    errors.append(e)
                self.worker = None

        stopper = threading.Thread(target=stop_worker, name="stop-worker")
        stopper.start()
        if self._triton_thread and self._triton_thread.is_alive():
            if self.triton is not None:  # still starting (the model loading): kill it rather than wait for it
                self.triton.abort()
            self._triton_thread.join(timeout=self.cfg.serve.ready_timeout)
        if self.triton is not None:
            try:
                self.triton.stop(kill=idle)
            except (OSError, FbasError) as e:
                errors.append(e)
            self.triton = None
        stopper.join()
        if self.redis:
            self.redis.stop()
            self.redis = None
        if self._work:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        (self.state_dir / PIDS_FILE).unlink(missing_ok=True)
        for err in errors:
            logger.warning("while stopping the local cluster: %s", err)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
