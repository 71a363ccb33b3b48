"""The Celery worker process and its supervisor: local mode's worker and ``fbas-pipeline worker`` alike.

    w = CeleryWorker(env, concurrency, log_file).start()   # python -m celery -A workers.app worker, supervised
    w.stop()                                                # warm shutdown, then SIGKILL of its group
    run_worker(cfg, loglevel)                               # `fbas-pipeline worker`: the same, in the foreground

The worker is configured through ``FBAS_*`` variables in its environment (never its command line, where
``ps`` would show a broker password). It dies with the thread that started it (``PR_SET_PDEATHSIG``), and a
worker that exits with ``workers.watchdog.EX_RESTART`` (its broker came back after an outage) is started
again, at most ``RESTARTS_PER_MINUTE`` times a minute. Each ``start`` gives the worker a fresh private
``PROMETHEUS_MULTIPROC_DIR`` (``workers.metrics``), removed when the worker has stopped for good (or, after a
``kill -9`` of its supervisor, by the next ``start`` on the host).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from core.config import FbasConfig, config_env
from core.envs import cpu_count, env_name
from core.processes import die_with_parent_signal, kill_group, pid_alive
from services.repository import REPO_ROOT
from workers.metrics import MULTIPROC_ENV
from workers.watchdog import EX_RESTART

logger = logging.getLogger(__name__)

__all__ = [
    "CeleryWorker",
    "default_concurrency",
    "pool_size",
    "run_worker",
    "detach_dying_with_parent",
    "RESTARTS_PER_MINUTE",
]

RESTARTS_PER_MINUTE = 5
METRICS_DIR_PREFIX = "fbas-metrics-"  # + "<supervisor pid>-<random>": a worker's PROMETHEUS_MULTIPROC_DIR


def default_concurrency(gpu: bool = False, n_gpus: int = 1) -> int:
    """Worker processes for a host. CPU engine: half the cores, 2 to 4 (the engine needs the rest; one worker
    tokenizes and writes while another waits on Triton). GPU engine: the cores + 4 per GPU, 2 to 32 per GPU:
    the workers' tokenization is what feeds the GPUs, and each worker leaves its core idle while it waits
    for Triton, so every card gets requests in flight while the cores tokenize."""
    if gpu:
        return max(2, min(32 * max(1, n_gpus), cpu_count() + 4 * max(1, n_gpus)))
    return max(2, min(4, cpu_count() // 2))


def pool_size(cfg: FbasConfig) -> int:
    """Worker processes for ``cfg``: ``--concurrency``, or 0 = ``default_concurrency`` for its engine target
    and the GPUs it is served on (``--gpus``, else every visible one)."""
    if cfg.queue.concurrency:
        return cfg.queue.concurrency
    gpu = cfg.engine.target != "onnx"
    n_gpus = len([g for g in cfg.serve.gpus.split(",") if g.strip()]) if cfg.serve.gpus.strip() else 0
    if gpu and not n_gpus:
        from services.gpus import visible_gpus

        n_gpus = len(visible_gpus())
    return default_concurrency(gpu=gpu, n_gpus=n_gpus)


def _new_metrics_dir() -> str:
    """A fresh folder for a worker's metrics files, after removing those of supervisors that were killed."""
    for d in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = d.name[len(METRICS_DIR_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")


def detach_dying_with_parent() -> None:
    """In a child between fork and exec: a session of its own, killed when the parent thread exits."""
    die_with_parent_signal()
    os.setsid()


class CeleryWorker:
    """``python -m celery -A workers.app worker`` as a supervised child, configured through ``FBAS_*``
    variables. ``log_file`` None: the child writes to this process's stdout and stderr."""

    def __init__(
        self,
        env: dict[str, str],
        concurrency: int,
        log_file: Path | None,
        name: str = "fbas-local",
        extra_env: dict[str, str] | None = None,
        loglevel: str = "INFO",
    ) -> None:
        self.env = {**os.environ, **env, **(extra_env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(x for x in [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")] if x)
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.concurrency, self.log_file, self.loglevel = concurrency, log_file, loglevel
        self.name = f"{name}-{secrets.token_hex(3)}@%h"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self._start_error: BaseException | None = None

    def command(self) -> list[str]:
        from workers.app import QUEUE

        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "worker",
            "-Q",
            QUEUE,
            "--pool",
            "prefork",
            "--concurrency",
            str(self.concurrency),
            "--prefetch-multiplier",
            "1",
            "--loglevel",
            self.loglevel,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            self.name,
        ]

    def _spawn(self) -> subprocess.Popen:
        log = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115 - owned by the child
        try:
            proc = subprocess.Popen(
                self.command(),
                env=self.env,
                cwd=str(REPO_ROOT),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                preexec_fn=detach_dying_with_parent,
            )
        finally:
            if log:
                log.close()
        logger.info("celery worker started (pid %d, concurrency %d, log %s)", proc.pid, self.concurrency, self.log_file)
        return proc

    def start(self) -> CeleryWorker:
        """Start the worker, and a thread that starts it again when it asks to be (``EX_RESTART``). The
        thread spawns every later worker, so it lives as long as they do (their parent-death signal)."""
        self._stopping.clear()
        metrics_dir = self.env[MULTIPROC_ENV] = _new_metrics_dir()  # the pool's metrics files (workers.metrics)
        ready = threading.Event()
        self._supervisor = threading.Thread(
            target=self._supervise, args=(ready, metrics_dir), name="worker-supervisor", daemon=True
        )
        self._supervisor.start()
        ready.wait()
        if self._start_error is not None:  # the first worker could not even be started
            raise self._start_error
        return self

    def _supervise(self, ready: threading.Event, metrics_dir: str) -> None:
        try:
            self._run(ready)
        finally:  # the worker stopped for good: its metrics files go with it
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _run(self, ready: threading.Event) -> None:
        recent: list[float] = []
        try:
            with self._lock:
                self.proc = self._spawn()
        except BaseException as e:  # noqa: BLE001 - handed to start(), in the caller's thread
            self._start_error = e
            return
        finally:
            ready.set()
        while True:
            proc = self.proc
            code = proc.wait() if proc is not None else None
            with self._lock:
                if self._stopping.is_set() or code != EX_RESTART:
                    return
                now = time.monotonic()
                recent = [t for t in recent if now - t < 60] + [now]
                if len(recent) > RESTARTS_PER_MINUTE:
                    logger.error("the celery worker asked to restart %d times within a minute: not again", len(recent))
                    return
                self.restarts += 1
                logger.warning("the celery worker restarts (its broker came back after an outage)")
                self.proc = self._spawn()

    def alive(self) -> bool:
        """Whether a worker runs, or is about to be started again (its supervisor has not given up)."""
        proc, supervisor = self.proc, self._supervisor
        if proc is None or supervisor is None:
            return False
        return proc.poll() is None or (proc.returncode == EX_RESTART and supervisor.is_alive())

    def children(self) -> list[int]:
        """Pids of the worker's pool processes (its direct children)."""
        if not self.proc:
            return []
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children", encoding="ascii") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def wait(self) -> int | None:
        """Wait until the worker stopped for good; its exit code."""
        if self._supervisor is not None:
            self._supervisor.join()
        return self.proc.returncode if self.proc is not None else None

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (running batches finish), then SIGKILL of the whole group after ``timeout`` seconds."""
        self._stopping.set()
        with self._lock:
            proc = self.proc
        if not proc:
            return
        if proc.poll() is None:
            kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("celery worker did not stop within %.0fs: killing it", timeout)
        kill_group(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        self.proc = None


def run_worker(cfg: FbasConfig, loglevel: str = "INFO") -> int:
    """`fbas-pipeline worker`: a supervised Celery worker in the foreground until SIGTERM or Ctrl-C (a warm
    shutdown: running batches finish); returns its exit code."""
    env = config_env(cfg)
    env.setdefault(env_name("out_root"), os.getcwd())  # the child runs in the repository: name this folder
    worker = CeleryWorker(env, pool_size(cfg), None, name="fbas", loglevel=loglevel)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    worker.start()
    try:
        while not stop.is_set() and worker.alive():
            stop.wait(0.5)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if stop.is_set():
            worker.stop(timeout=max(30.0, cfg.queue.task_time_limit))
    code = worker.wait()
    return 0 if stop.is_set() else int(code or 0)
