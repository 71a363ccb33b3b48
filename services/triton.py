"""The tritonserver process supervisor (the repository entry it serves: ``services.repository``).

    find_tritonserver(explicit)    where the tritonserver binary and its backends are
    TritonProcess(...)             start/stop tritonserver as a child process, poll readiness
    sweep_stale_shm_regions()      remove shared-memory regions of Python-backend stubs that died

The binary is the one the ``nvidia-pytriton`` wheel ships (unpacked by
``deploy/install_triton.sh`` into ``.venv/triton/``, without the package's ``numpy<2`` pin).
It runs the Python backend on CPU; the stub imports numpy, onnxruntime and this repository
from the environment of the ``python`` first on ``PATH``, so the child environment puts this
interpreter's folder first and the repository root on ``PYTHONPATH``.

Local mode listens on loopback only, with model control mode ``none`` (no load/unload API).
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from core.errors import ConfigError, PermanentError, ServerUnavailableError
from core.processes import die_with_parent_signal
from services.repository import REPO_ROOT

logger = logging.getLogger(__name__)

__all__ = [
    "TritonPaths",
    "find_tritonserver",
    "free_port",
    "TritonProcess",
    "ServerExitedError",
    "sweep_stale_shm_regions",
]


# Lines tritonserver prints on a host without a GPU that mean nothing there (its CUDA and GPU-metrics probes):
# kept in its log file, not echoed to the terminal of `serve`.
HARMLESS_ON_CPU = (
    "CudaDriverHelper has not been initialized",
    "Failed to initialize NVML",
    "DCGM",
)


class ServerExitedError(PermanentError):
    """tritonserver exited on its own (bad repository, model failed to load, port taken)."""


# --------------------------------------------------------------------------------------------------
# the repository entry


# --------------------------------------------------------------------------------------------------
# the binary


@dataclass(frozen=True)
class TritonPaths:
    """Where one tritonserver installation lives."""

    binary: Path
    backend_dir: Path
    lib_dir: Path | None  # nvidia_pytriton.libs for the wheel's binary; None for a system install


def _paths_for(binary: Path) -> TritonPaths:
    root = binary.resolve().parent.parent  # .../tritonserver
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonPaths(binary, root / "backends", libs if libs.is_dir() else None)


def find_tritonserver(explicit: str | None = None) -> TritonPaths:
    """The tritonserver to run: ``explicit`` (config ``tritonserver`` / ``FBAS_TRITONSERVER``), else the one
    ``deploy/install_triton.sh`` put next to this interpreter's venv or the repository's ``.venv``, else
    ``tritonserver`` on ``PATH`` (an NGC container: backends in /opt/tritonserver/backends)."""
    if explicit:
        p = Path(explicit)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise ConfigError(
                f"tritonserver {explicit!r} (from --tritonserver / FBAS_TRITONSERVER) is not an executable file"
            )
        return _paths_for(p)
    rel = Path("triton/pytriton/tritonserver/bin/tritonserver")
    for venv in (Path(sys.prefix), REPO_ROOT / ".venv"):
        if (venv / rel).is_file():
            return _paths_for(venv / rel)
    found = shutil.which("tritonserver")
    if found:
        paths = _paths_for(Path(found))
        if not paths.backend_dir.is_dir() and Path("/opt/tritonserver/backends").is_dir():
            paths = TritonPaths(Path(found), Path("/opt/tritonserver/backends"), None)
        return paths
    raise ConfigError(
        "tritonserver not found: run `bash deploy/install_triton.sh .venv` (or `make setup`), "
        "or point FBAS_TRITONSERVER at the binary"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# the process


class TritonProcess:
    """tritonserver as a child process: ``with TritonProcess(repo) as t: ... t.grpc_url ...``.

    Ports given as 0 are picked free on first start and kept across ``restart()``. The
    server's output is kept (last ``tail_lines`` lines) for error messages, and echoed to
    ``echo`` and/or appended to ``log_file`` when given.
    """

    def __init__(
        self,
        repo_dir: str | Path,
        *,
        model_name: str = "fbas_encoder",
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        ready_timeout: float = 120.0,
        tritonserver: str | None = None,
        log_file: str | Path | None = None,
        echo: TextIO | None = None,
        exit_timeout: int = 5,
        tail_lines: int = 200,
    ) -> None:
        self.repo_dir = Path(repo_dir).resolve()
        self.model_name, self.host = model_name, host
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.ready_timeout, self.exit_timeout = ready_timeout, exit_timeout
        self.paths = find_tritonserver(tritonserver)
        self.log_file, self.echo = (Path(log_file) if log_file else None), echo
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._stop_lock = threading.Lock()  # stop() may run in two threads: a start that failed, and its owner
        self._aborted = threading.Event()  # abort(): a start in another thread gives up for good
        # The Python backend's server<->stub shared-memory regions (/dev/shm/<prefix>*): named per
        # process so that stop() can remove the ones tritonserver leaves behind (it does, even on SIGTERM).
        self.shm_prefix = f"fbas_py_{os.getpid()}_{uuid.uuid4().hex[:8]}_"

    @classmethod
    def from_config(cls, cfg: Any, **kw: Any) -> TritonProcess:
        s = cfg.serve
        return cls(
            s.model_repository,
            model_name=s.model_name,
            host=s.host,
            grpc_port=s.grpc_port,
            http_port=s.http_port,
            metrics_port=s.metrics_port,
            ready_timeout=s.ready_timeout,
            tritonserver=getattr(s, "tritonserver", None),
            **kw,
        )

    # -- addresses
    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports['metrics']}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def model_stats(self) -> dict[str, float]:
        """Triton's account of the model's work so far, summed over its instances: executions and requests;
        seconds in the queue and in compute (``compute_infer`` is counted once per request, so a merged
        execution counts several times; input and output copies apart); and the model's own counters
        (``model_repository/model.py``): seconds in ``execute`` and, inside them, in the engine's ``embed`` and
        in capturing CUDA graphs (absent when the metrics endpoint cannot be read)."""
        from prometheus_client.parser import text_string_to_metric_families

        from workers.triton_client import ClientOptions, TritonEncoder

        with TritonEncoder(ClientOptions(url=self.grpc_url, model_name=self.model_name, ready_timeout=5.0)) as enc:
            st = enc.model_statistics()
        infer = st.get("inference_stats", {})

        def secs(key: str) -> float:
            return round(int(infer.get(key, {}).get("ns", 0)) / 1e9, 6)

        out = {
            "engine_executions": int(st.get("execution_count", 0)),
            "engine_requests": int(st.get("inference_count", 0)),
            "engine_compute_s": secs("compute_infer"),
            "engine_queue_s": secs("queue"),
            "engine_input_s": secs("compute_input"),
            "engine_output_s": secs("compute_output"),
        }
        names = {
            "fbas_model_execute_seconds": "model_execute_s",
            "fbas_engine_embed_seconds": "model_embed_s",
            "fbas_engine_graph_capture_seconds": "model_capture_s",  # GPU: CUDA graphs of new shapes, inside embed
        }
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5.0) as r:
                text = r.read().decode("utf-8", "replace")
        except OSError:
            return out
        for family in text_string_to_metric_families(text):
            key = names.get(family.name)
            if key is not None:
                out[key] = round(sum(s.value for s in family.samples if s.name.endswith("_total")), 6)
        return out

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(list(self._tail)[-n:])

    # -- lifecycle
    def command(self) -> list[str]:
        p = self.ports
        return [
            str(self.paths.binary),
            "--model-repository",
            str(self.repo_dir),
            "--backend-directory",
            str(self.paths.backend_dir),
            "--model-control-mode",
            "none",
            "--http-address",
            self.host,
            "--http-port",
            str(p["http"]),
            "--grpc-address",
            self.host,
            "--grpc-port",
            str(p["grpc"]),
            "--metrics-address",
            self.host,
            "--metrics-port",
            str(p["metrics"]),
            "--allow-gpu-metrics",
            "false",
            "--pinned-memory-pool-byte-size",
            "0",
            "--strict-readiness",
            "true",
            "--disable-auto-complete-config",
            "--exit-timeout-secs",
            str(self.exit_timeout),
            "--log-verbose",
            "0",
            "--backend-config",
            "python,shm-default-byte-size=16777216",
            "--backend-config",
            "python,shm-growth-byte-size=16777216",
            "--backend-config",
            f"python,shm-region-prefix-name={self.shm_prefix}",
        ]

    def environment(self) -> dict[str, str]:
        """The child's environment: this interpreter first on PATH, the repo on PYTHONPATH, the wheel's libs."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(x for x in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if x)
        if self.paths.lib_dir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                x for x in [str(self.paths.lib_dir), env.get("LD_LIBRARY_PATH", "")] if x
            )
        env.setdefault("OMP_NUM_THREADS", "1")  # ORT sizes its own pool; keep stray OpenMP pools small
        return env

    def start(self) -> TritonProcess:
        """Start the server (on the same ports as before, after a stop) and wait until the model is ready."""
        self.launch()
        return self.wait_started()

    def launch(self, die_with_parent: bool = False) -> TritonProcess:
        """Start the process without waiting for the model (``wait_started`` does). ``die_with_parent``: the
        kernel kills the server when the calling *thread* exits, ``kill -9`` of this process included, so
        call it from the thread that lives as long as the server should (local mode: the main thread)."""
        if self._proc and self._proc.poll() is None:
            raise RuntimeError("tritonserver is already running")
        if not self.repo_dir.is_dir():
            raise ConfigError(f"model repository {self.repo_dir} does not exist: write it with `fbas-pipeline build`")
        for k, v in self.ports.items():
            if not v:
                self.ports[k] = free_port(self.host)
        self._tail.clear()
        sweep_stale_shm_regions()
        if self._aborted.is_set():
            raise ServerUnavailableError("tritonserver's start was aborted")
        logger.info(
            "starting tritonserver: gRPC %s, HTTP %s, repository %s", self.grpc_url, self.http_url, self.repo_dir
        )
        proc = self._proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent_signal if die_with_parent else None,
        )
        self._reader = threading.Thread(target=self._pump, args=(proc,), name="tritonserver-log", daemon=True)
        self._reader.start()
        if self._aborted.is_set():  # aborted while the process was being created
            self._signal_group(proc, signal.SIGKILL)
        return self

    def wait_started(self) -> TritonProcess:
        """Wait (``ready_timeout``) until the launched server serves the model; stop it if it does not."""
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _pump(self, proc: subprocess.Popen) -> None:
        sink = open(self.log_file, "a", encoding="utf-8") if self.log_file else None  # noqa: SIM115
        try:
            for raw in proc.stdout:  # type: ignore[union-attr]
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self._tail.append(line)
                if sink:
                    sink.write(line + "\n")
                    sink.flush()
                if self.echo and not any(n in line for n in HARMLESS_ON_CPU):
                    self.echo.write(line + "\n")
        finally:
            if sink:
                sink.close()

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=1.0) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_ready(self) -> bool:
        """Server live and the model ready (HTTP health endpoints)."""
        return self._http_ok("/v2/health/ready") and self._http_ok(f"/v2/models/{self.model_name}/ready")

    def wait_ready(self, timeout: float) -> None:
        """Poll readiness every 0.1 s; raise ``ServerExitedError`` with the log tail if the server dies."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self._proc  # read once: another thread's stop() sets it to None
            code = proc.poll() if proc else -1
            if code is not None:
                self._join_reader()
                raise ServerExitedError(
                    f"Server exited unexpectedly (exit code {code}) while starting. "
                    f"Last lines of its log:\n{self.log_tail()}"
                )
            assert proc is not None, "no process reads as exit code -1 above"
            if self.is_ready():
                logger.info("tritonserver ready (pid %d), model %s", proc.pid, self.model_name)
                return
            if time.monotonic() > deadline:
                raise ServerUnavailableError(
                    f"tritonserver not ready after {timeout:.0f}s (model "
                    f"{self.model_name!r}). Last lines of its log:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _join_reader(self) -> None:
        if self._reader:
            self._reader.join(timeout=2.0)

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group we created: the server and its backend stubs
        except ProcessLookupError:
            pass

    def abort(self) -> None:
        """From another thread, while ``start()`` runs there (e.g. the model still loading): kill the server
        now, without waiting; that ``start()`` then raises and cleans up. A start not begun yet gives up."""
        self._aborted.set()
        proc = self._proc
        if proc is not None:
            self._signal_group(proc, signal.SIGKILL)

    def stop(self, kill: bool = False) -> int | None:
        """SIGTERM (in-flight requests finish within ``exit_timeout``), then SIGKILL; return the exit code."""
        with self._stop_lock:
            proc = self._proc
            if proc is None:
                return None
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    proc.wait(timeout=self.exit_timeout + 10)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "tritonserver did not exit within %ds of SIGTERM: killing it", self.exit_timeout + 10
                    )
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=10)
            self._signal_group(proc, signal.SIGKILL)  # stray backend stubs, if any
            self._join_reader()
            self._proc = None
            self._remove_shm_regions()
            return proc.returncode

    def _remove_shm_regions(self) -> None:
        shm = Path("/dev/shm")
        if shm.is_dir():
            for region in shm.glob(self.shm_prefix + "*"):
                region.unlink(missing_ok=True)

    def restart(self, kill: bool = False) -> TritonProcess:
        """Stop (gracefully, or ``kill=True`` for a crash) and start again on the same ports."""
        self.stop(kill=kill)
        return self.start()

    def poll(self) -> int | None:
        return self._proc.poll() if self._proc else -1

    def __enter__(self) -> TritonProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def sweep_stale_shm_regions() -> list[str]:
    """Remove Python-backend regions (/dev/shm/fbas_py_<pid>_*) left by owners that died without stopping
    their server (e.g. killed with SIGKILL), when no live process maps them. Returns the names removed."""
    shm = Path("/dev/shm")
    stale = []
    for region in shm.glob("fbas_py_*") if shm.is_dir() else []:
        try:
            owner = int(region.name.split("_")[2])
        except (IndexError, ValueError):
            continue
        if not Path(f"/proc/{owner}").exists():
            stale.append(region)
    if not stale:
        return []
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text(errors="replace")
        except OSError:
            continue
        mapped.update(r.name for r in stale if r.name in text)
    removed = []
    for region in stale:
        if region.name not in mapped:
            region.unlink(missing_ok=True)
            removed.append(region.name)
    if removed:
        logger.info("removed %d stale Triton Python-backend shared-memory regions from /dev/shm", len(removed))
    return removed


# --------------------------------------------------------------------------------------------------
# `fbas-pipeline serve`
