"""Which NVIDIA GPUs this host shows a server: ``nvidia-smi -L``'s list, narrowed by ``CUDA_VISIBLE_DEVICES``.

Asked without importing a CUDA library, so a CPU-only host answers at once, and before anything is started
for a GPU engine.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from core.errors import ConfigError

__all__ = ["visible_gpus", "require_gpus"]


def visible_gpus() -> list[str]:
    """Indices (as ``CUDA_VISIBLE_DEVICES`` names them, or nvidia-smi's) of the GPUs a child process would see."""
    listed: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        listed = [line.split(":", 1)[0].split()[1] for line in out.splitlines() if line.startswith("GPU ")]
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is None:
        return listed
    wanted = [d.strip() for d in chosen.split(",") if d.strip()]
    if any(d.startswith("-") for d in wanted):  # CUDA stops at the first invalid index
        wanted = wanted[: next(i for i, d in enumerate(wanted) if d.startswith("-"))]
    return [d for d in wanted if d in listed or not d.isdigit()] if listed else []


def require_gpus(what: str) -> list[str]:
    """The visible GPUs, or a one-line ``ConfigError`` that says none is visible and what to do instead."""
    gpus = visible_gpus()
    if not gpus:
        why = (
            f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides them"
            if os.environ.get("CUDA_VISIBLE_DEVICES") is not None and shutil.which("nvidia-smi")
            else "nvidia-smi lists none"
            if shutil.which("nvidia-smi")
            else "there is no nvidia-smi (no NVIDIA driver)"
        )
        raise ConfigError(
            f"{what} needs an NVIDIA GPU and this host shows none ({why}): run it on a GPU host, "
            "or use --target onnx (CPU)"
        )
    return gpus
