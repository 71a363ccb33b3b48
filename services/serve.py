"""`fbas-pipeline serve`: run tritonserver on a model repository until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from core.errors import ConfigError, ServerUnavailableError
from services.triton import ServerExitedError, TritonProcess

logger = logging.getLogger(__name__)

__all__ = ["run_serve"]


RESTARTS = 5  # restarts within RESTART_WINDOW_S before serve gives up (a server that cannot stay up)
RESTART_WINDOW_S = 600.0


def run_serve(cfg: Any) -> int:
    """Serve ``cfg.serve.model_repository`` until Ctrl-C / SIGTERM; returns the process exit code (0 = stopped).

    A tritonserver that dies is started again on the same ports (after 1, 2, 4 ... s, at most ``RESTARTS``
    times in ``RESTART_WINDOW_S``), and says so; meanwhile workers retry their requests. Raises
    ``ConfigError`` for a missing/empty repository and ``ServerExitedError`` (with the server's log tail)
    when it cannot be kept up."""
    s = cfg.serve
    repo = Path(s.model_repository)
    if not repo.is_dir() or not (repo / s.model_name / "config.pbtxt").is_file():
        raise ConfigError(
            f"{repo} holds no Triton model {s.model_name!r}: serve a built model folder with "
            f"`fbas-pipeline serve --model-dir models/NAME --model-repository {repo}` (it writes the entry "
            f"first), or write the entry when building: `fbas-pipeline build --out models/NAME "
            f"--model-repository {repo}`"
        )
    if s.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("Triton listens on %s, not loopback: put it behind a network boundary you trust", s.host)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping tritonserver", signum)
        stop.set()

    previous = signal.signal(signal.SIGTERM, _on_signal)
    proc = TritonProcess.from_config(cfg, echo=sys.stderr)  # the server's log goes to our stderr
    try:
        proc.start()
        print(
            f"Triton serving {s.model_name!r}: gRPC {proc.grpc_url}, HTTP {proc.http_url}, metrics "
            f"{proc.metrics_url} (Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )
        _supervise(proc, stop)
    except KeyboardInterrupt:
        logger.info("interrupted: stopping tritonserver")
    finally:
        proc.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0


def _supervise(proc: TritonProcess, stop: threading.Event) -> None:
    """Until ``stop``: start the server again whenever it dies, within the restart budget."""
    restarts: list[float] = []
    while not stop.wait(0.5):
        code = proc.poll()
        if code is None and proc.pid is not None:
            continue  # serving (a failed restart leaves no process: pid None)
        proc.stop(kill=True)  # reap what is left of it (backend stubs, shared memory)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < RESTART_WINDOW_S]
        if len(restarts) >= RESTARTS:
            raise ServerExitedError(
                f"tritonserver exited (exit code {code}) for the {len(restarts) + 1}th time within "
                f"{RESTART_WINDOW_S:.0f}s: not starting it again. Last lines of its log:\n{proc.log_tail()}"
            )
        delay = 2.0 ** len(restarts)
        restarts.append(now)
        print(
            f"tritonserver exited (exit code {code}): starting it again in {delay:.0f}s on the same ports "
            f"(restart {len(restarts)} of at most {RESTARTS} in {RESTART_WINDOW_S / 60:.0f} min)",
            file=sys.stderr,
            flush=True,
        )
        if stop.wait(delay):
            return
        try:
            proc.start()
            print(f"tritonserver serves again (gRPC {proc.grpc_url})", file=sys.stderr, flush=True)
        except (ServerExitedError, ServerUnavailableError) as e:
            logger.warning("tritonserver did not come back: %s", str(e).splitlines()[0])
