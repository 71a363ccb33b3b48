"""This host's processes: whether one runs (read from /proc, no signal sent), stopping a process group, and
children that die with their parent."""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = ["pid_alive", "kill_group", "die_with_parent_signal", "fixed_mmap_threshold"]

_M_MMAP_THRESHOLD = -3  # mallopt(3)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
    except OSError:
        return True


def kill_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group ``pid`` leads, or to ``pid`` alone when it leads none."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc Linux: a parent's clean-up stops its children instead
        return None


# loaded here, not in the child: a dlopen between fork and exec can deadlock on a loader lock that another
# thread of this process held at the fork
_LIBC = _libc()


def die_with_parent_signal() -> None:
    """In a child between fork and exec: ask the kernel for SIGKILL when the parent thread exits (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def fixed_mmap_threshold(nbytes: int = 128 << 10) -> bool:
    """Give every allocation of ``nbytes`` or more its own mapping, returned to the system when freed (glibc's
    ``mallopt(M_MMAP_THRESHOLD)``), for the rest of the process's life; returns whether it was set (not on other
    C libraries).

    By default glibc raises that threshold each time a large mapped block is freed (up to 32 MB), after which
    blocks of that size come from the heap. In ``ingest``, whose readers decode a part of several MB at a time
    while the job's small per-part arrays live on, the heap then grew with the row count: 40.8 bytes a row of
    peak memory from 1 M to 3 M rows against 24.6 with the threshold fixed (BENCHMARKS.md, NOTES 4p). The
    ``ingest`` command sets it for its own process; ``ingest()`` does not, since it may run in a caller's."""
    if _LIBC is None:
        return False
    try:
        mallopt = _LIBC.mallopt
    except AttributeError:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes))
