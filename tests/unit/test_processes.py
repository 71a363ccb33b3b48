"""core.processes: the heap setting ``ingest`` makes, checked in fresh processes against glibc's own account of
its mapped blocks (``mallinfo2``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import ctypes, sys
from core.processes import fixed_mmap_threshold

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
big = bytearray(8 << 20)  # a mapped block; freeing it raises glibc's sliding threshold to 8 MB
del big
if sys.argv[1] == "fixed":
    assert fixed_mmap_threshold()
before = libc.mallinfo2().hblks
kept = bytearray(1 << 20)
print(libc.mallinfo2().hblks - before)
"""


def _mapped_blocks_for_one_mb(mode: str) -> int:
    # glibc's own defaults in the child: no malloc settings inherited from this environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    p = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.strip())


def _glibc_with_mallinfo2() -> bool:
    lib, version = platform.libc_ver()
    return lib == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 33)


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc 2.33 or later (mallopt and mallinfo2)")
def test_after_a_large_block_is_freed_a_megabyte_still_gets_its_own_mapping():
    """Without the setting glibc serves the megabyte from the heap (its threshold slid to 8 MB), where it can
    pin the heap's top; with it, the megabyte is mapped on its own and given back when freed."""
    assert _mapped_blocks_for_one_mb("default") == 0, "glibc's sliding threshold put the megabyte in the heap"
    assert _mapped_blocks_for_one_mb("fixed") == 1
