"""Load the CUDA C++ fused-kernel library built by ``dll/build.sh`` and call it on torch tensors.

    lib = load(torch.device("cuda"))   # None when no library was built for this GPU
    y = lib.residual_layernorm(x, bias, residual, gamma, beta, eps)

The library for compute capability X.Y is ``dll/build/sm_XY/libfbas_fused.so``; a card of
the same major version and a higher minor one may use a lower minor's build (binary
compatibility), e.g. sm_86 runs sm_80. Every function has a twin of the same meaning in
``engine.gpu_kernels.TorchKernels``; inputs the library cannot take (fp32, unaligned rows,
H not a multiple of 8) go to that twin. Kernels run on PyTorch's current stream, so they
are captured into CUDA graphs like any other launch.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["load", "lib_path", "FusedLib", "BUILD_DIR"]

BUILD_DIR = Path(__file__).resolve().parent / "build"
LIB_NAME = "libfbas_fused.so"
ABI_VERSION = 1
_DTYPES = {torch.float16: 0, torch.bfloat16: 1}
_cache: dict[int, FusedLib | None] = {}


def lib_path(device: torch.device) -> Path:
    """Where the library for ``device``'s exact architecture would be."""
    major, minor = torch.cuda.get_device_capability(device)
    return BUILD_DIR / f"sm_{major}{minor}" / LIB_NAME


def _candidates(device: torch.device) -> list[Path]:
    major, minor = torch.cuda.get_device_capability(device)
    return [BUILD_DIR / f"sm_{major}{m}" / LIB_NAME for m in range(minor, -1, -1)]


def load(device: torch.device) -> FusedLib | None:
    """The library for ``device`` (cached), or None when none was built for its architecture."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _cache:
        return _cache[index]
    found = None
    for path in _candidates(torch.device("cuda", index)):
        if path.exists():
            try:
                found = FusedLib(path)
            except OSError as e:
                logger.warning("cannot load %s (%s); using other kernels", path, e)
                continue
            logger.info("loaded CUDA kernel library %s", path)
            break
    _cache[index] = found
    return found


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _aligned(*ts: torch.Tensor | None) -> bool:
    return all(t is None or (t.is_contiguous() and t.data_ptr() % 16 == 0) for t in ts)


class FusedLib:
    """ctypes binding of ``libfbas_fused.so``; methods take and return torch tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        c_i64, c_int, c_f, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        lib.fbas_abi_version.restype = c_int
        if lib.fbas_abi_version() != ABI_VERSION:
            raise OSError(
                f"{path} has ABI version {lib.fbas_abi_version()}, expected {ABI_VERSION}: "
                "rebuild with bash dll/build.sh"
            )
        lib.fbas_residual_layernorm.argtypes = [vp, vp, vp, vp, vp, vp, c_i64, c_int, c_f, c_int, vp]
        lib.fbas_embed_layernorm.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, c_i64, c_int, c_f, c_int, vp]
        lib.fbas_bias_act.argtypes = [vp, vp, vp, c_i64, c_int, c_int, c_int, vp]
        for f in (lib.fbas_residual_layernorm, lib.fbas_embed_layernorm, lib.fbas_bias_act):
            f.restype = c_int
        self._lib = lib

    @staticmethod
    def _stream(t: torch.Tensor) -> ctypes.c_void_p:
        return ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what} failed to launch: CUDA error {rc}")

    def _twin(self):
        from dll.twins import TorchKernels

        return TorchKernels()

    def residual_layernorm(self, x, bias, residual, gamma, beta, eps: float) -> torch.Tensor:
        """LN(x + bias + residual) ``[T, H]`` (fp16/bf16, gamma/beta float32; bias, residual may be None)."""
        T, H = x.shape
        if (
            x.dtype not in _DTYPES
            or (residual is not None and x.dtype != residual.dtype)
            or H % 8
            or H > 4096
            or (bias is not None and bias.dtype != x.dtype)
            or not _aligned(x, bias, residual)
        ):
            return self._twin().bias_residual_layernorm(x, bias, residual, gamma, beta, eps)
        y = torch.empty_like(x)
        self._check(
            self._lib.fbas_residual_layernorm(
                _ptr(y),
                _ptr(x),
                _ptr(bias),
                _ptr(residual),
                _ptr(gamma),
                _ptr(beta),
                T,
                H,
                eps,
                _DTYPES[x.dtype],
                self._stream(x),
            ),
            "fbas_residual_layernorm",
        )
        return y

    def embed_layernorm(self, ids, pos, word, posw, type0, gamma, beta, eps: float) -> torch.Tensor:
        """LN(word[ids] + posw[pos] + type0) ``[T, H]`` in word's dtype (ids, pos int32)."""
        T, H = ids.shape[0], word.shape[1]
        if (
            word.dtype not in _DTYPES
            or H % 8
            or H > 4096
            or ids.dtype != torch.int32
            or pos.dtype != torch.int32
            or not _aligned(word, posw, type0)
        ):
            return self._twin().embed_layernorm(ids, pos, word, posw, type0, gamma, beta, eps)
        y = torch.empty(T, H, dtype=word.dtype, device=word.device)
        self._check(
            self._lib.fbas_embed_layernorm(
                _ptr(y),
                _ptr(ids),
                _ptr(pos),
                _ptr(word),
                _ptr(posw),
                _ptr(type0),
                _ptr(gamma),
                _ptr(beta),
                T,
                H,
                eps,
                _DTYPES[word.dtype],
                self._stream(word),
            ),
            "fbas_embed_layernorm",
        )
        return y

    def bias_act(self, x, bias, act: int) -> torch.Tensor:
        """act(x + bias) ``[T, C]``; act 0 erf-GELU, 1 tanh-GELU, 2 ReLU."""
        T, C = x.shape
        if x.dtype not in _DTYPES or C % 8 or bias.dtype != x.dtype or not _aligned(x, bias):
            from dll.twins import ACTS

            name = {v: k for k, v in ACTS.items()}[act]
            return self._twin().bias_act(x, bias, name)
        y = torch.empty_like(x)
        self._check(
            self._lib.fbas_bias_act(_ptr(y), _ptr(x), _ptr(bias), T, C, act, _DTYPES[x.dtype], self._stream(x)),
            "fbas_bias_act",
        )
        return y
