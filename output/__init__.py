"""Output: the ledger of committed parts, finalize (check, merge, index, manifest), search, evaluation, status.
Imports workers, engine, dll and core only.

FAISS is imported only by this package, always later than this file runs: the OpenBLAS kernel its wheels use
is chosen here first (``core.envs.faiss_blas_kernel``: their OpenBLAS predates some of today's CPUs)."""

from core.envs import choose_faiss_blas_kernel

choose_faiss_blas_kernel()
