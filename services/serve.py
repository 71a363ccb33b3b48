"""`fbas-pipeline serve`: run tritonserver on a model repository until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from services.triton import ServerExitedError, TritonProcess

logger = logging.getLogger(__name__)

__all__ = ["run_serve"]


def run_serve(cfg: Any) -> int:
    """Serve ``cfg.serve.model_repository`` until Ctrl-C / SIGTERM; returns the process exit code (0 = stopped).

    Raises ``ConfigError`` for a missing/empty repository and ``ServerExitedError`` (with the
    server's log tail) when tritonserver dies on its own.
    """
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
        while not stop.is_set():
            if proc.poll() is not None:
                code = proc.poll()
                raise ServerExitedError(
                    f"Server exited unexpectedly (exit code {code}). Last lines of its log:\n{proc.log_tail()}"
                )
            stop.wait(0.5)
    except KeyboardInterrupt:
        logger.info("interrupted: stopping tritonserver")
    finally:
        proc.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0
