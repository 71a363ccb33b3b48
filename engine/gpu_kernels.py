"""The GPU engine's fused operations: a plain PyTorch twin for each, and the dispatch.

Every operation has one signature and three possible implementations:

- ``TorchKernels``: the twins, plain PyTorch in float32 arithmetic, on any device. They
  are the definition of what each fused kernel must compute, and the CPU path.
- ``TritonKernels``: Triton-language kernels from ``dll.triton_kernels`` (CUDA tensors).
- ``CudaKernels``: CUDA C++ kernels from ``dll/build/sm_XY/libfbas_fused.so`` (loaded by
  ``dll.cuda_lib``) for the ops they cover, Triton (or the twin) for the rest.

``select_kernels(name, device)`` returns one of these; ``auto`` takes Triton on CUDA when
Triton imports, else the CUDA library when it was built for this GPU, else the twins. So
the runtime always works without a compiled library.

Shapes: ``T`` packed tokens, ``N`` documents, ``H`` hidden size, ``I`` FFN size,
``nh`` heads, ``hd`` head size. ``cu_seqlens`` is int32 ``[N + 1]`` (0, l0, l0+l1, ...).
fp8 variants return row-quantized tensors: ``q`` float8_e4m3fn ``[T, C]`` and ``scale``
float32 ``[T, 1]`` with ``x * smooth ~= q * scale`` (``scale = max|row| / 448``); ``smooth``
is an optional float32 ``[C]`` per-channel factor (SmoothQuant-style, folded into the next
GEMM's weights by the runtime), None for 1.
"""

from __future__ import annotations

import logging

import torch

from dll.twins import ACTS, FP8_MAX, TorchKernels, quantize_rows_fp8

logger = logging.getLogger(__name__)

__all__ = [
    "TorchKernels",
    "TritonKernels",
    "CudaKernels",
    "select_kernels",
    "KERNEL_BACKENDS",
    "ACTS",
    "quantize_rows_fp8",
    "FP8_MAX",
    "flash_varlen",
]

KERNEL_BACKENDS = ("auto", "triton", "cuda", "torch")
POOL_MODES = {"mean": 0, "max": 1, "cls": 2}


class _DeviceKernels(TorchKernels):
    """What the Triton and CUDA kernel sets share: flash varlen attention for 16-bit CUDA tensors and
    cuBLAS fp8 GEMMs (``Fp8Gemm``), the twins for everything else."""

    def __init__(self) -> None:
        self._fp8 = Fp8Gemm()

    def varlen_attention(self, q, k, v, cu_seqlens, max_len, scale):
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return flash_varlen(q, k, v, cu_seqlens, max_len, scale)
        return super().varlen_attention(q, k, v, cu_seqlens, max_len, scale)

    def scaled_mm(self, a_q, a_scale, w_q, w_scale, bias, out_dtype, fast_accum=True):
        if not a_q.is_cuda:
            return super().scaled_mm(a_q, a_scale, w_q, w_scale, bias, out_dtype)
        return self._fp8.mm(a_q, a_scale, w_q, w_scale, bias, out_dtype, fast_accum)


class TritonKernels(_DeviceKernels):
    """Triton-language kernels (``dll.triton_kernels``); flash varlen attention and cuBLAS fp8 GEMM."""

    name = "triton"

    def __init__(self) -> None:
        from dll import triton_kernels as tk

        super().__init__()
        self.tk = tk

    def embed_layernorm(self, ids, pos, word, posw, type0, gamma, beta, eps):
        return self.tk.embed_layernorm(ids, pos, word, posw, type0, gamma, beta, eps, fp8=False)[0]

    def embed_layernorm_fp8(self, ids, pos, word, posw, type0, gamma, beta, eps, smooth=None):
        return self.tk.embed_layernorm(ids, pos, word, posw, type0, gamma, beta, eps, fp8=True, smooth=smooth)

    def bias_residual_layernorm(self, x, bias, residual, gamma, beta, eps):
        return self.tk.residual_layernorm(x, bias, residual, gamma, beta, eps, fp8=False)[0]

    def bias_residual_layernorm_fp8(self, x, bias, residual, gamma, beta, eps, smooth=None):
        return self.tk.residual_layernorm(x, bias, residual, gamma, beta, eps, fp8=True, smooth=smooth)

    def bias_act(self, x, bias, act="gelu"):
        return self.tk.bias_act(x, bias, ACTS[act], fp8=False)[0]

    def bias_act_fp8(self, x, bias, act="gelu", smooth=None):
        return self.tk.bias_act(x, bias, ACTS[act], fp8=True, smooth=smooth)[1:]

    def pool(self, x, cu_seqlens, mode, normalize, max_len):
        if mode not in POOL_MODES:
            raise ValueError(f"unknown pooling mode {mode!r} (mean, max, cls)")
        return self.tk.pool(x, cu_seqlens, POOL_MODES[mode], normalize, int(max_len))


class Fp8Gemm:
    """cuBLAS / CUTLASS fp8 GEMM through ``torch._scaled_mm`` with row-wise (per-token) and
    per-channel scales. PyTorch builds differ in whether the row-wise path fuses a bias; the
    first call with a bias finds out (it must run outside CUDA-graph capture: the engine warms up first)."""

    def __init__(self) -> None:
        self.fuse_bias: dict[bool, bool] = {}  # fast_accum -> bias fused in the GEMM

    def mm(self, a_q, a_scale, w_q, w_scale, bias, out_dtype, fast_accum: bool = True):
        def call(b):
            return torch._scaled_mm(
                a_q, w_q.t(), scale_a=a_scale, scale_b=w_scale, bias=b, out_dtype=out_dtype, use_fast_accum=fast_accum
            )

        if bias is None:
            return call(None)
        fuse = self.fuse_bias.get(fast_accum)
        if fuse is None:
            try:
                y = call(bias)
                self.fuse_bias[fast_accum] = True
                return y
            except RuntimeError as e:
                logger.info("torch._scaled_mm takes no bias with row-wise scales here (%s): adding it after", e)
                self.fuse_bias[fast_accum] = False
        elif fuse:
            return call(bias)
        return call(None).add_(bias)


class CudaKernels(_DeviceKernels):
    """CUDA C++ kernels (``dll.cuda_lib``) for LayerNorm and bias+activation; the other ops from
    ``TritonKernels`` when Triton imports, else from the twins (flash attention either way)."""

    name = "cuda"

    def __init__(self, lib) -> None:
        super().__init__()
        self.lib = lib
        try:
            self.tri: TorchKernels = TritonKernels()
        except ImportError:
            self.tri = TorchKernels()

    def embed_layernorm(self, ids, pos, word, posw, type0, gamma, beta, eps):
        return self.lib.embed_layernorm(ids, pos, word, posw, type0, gamma, beta, eps)

    def bias_residual_layernorm(self, x, bias, residual, gamma, beta, eps):
        if (residual is not None and x.dtype != residual.dtype) or x.dtype == torch.float32:
            return self.tri.bias_residual_layernorm(x, bias, residual, gamma, beta, eps)
        return self.lib.residual_layernorm(x, bias, residual, gamma, beta, eps)

    def bias_act(self, x, bias, act="gelu"):
        if x.dtype == torch.float32:
            return self.tri.bias_act(x, bias, act)
        return self.lib.bias_act(x, bias, ACTS[act])

    def embed_layernorm_fp8(self, *args, smooth=None):
        return self.tri.embed_layernorm_fp8(*args, smooth=smooth)

    def bias_residual_layernorm_fp8(self, *args, smooth=None):
        return self.tri.bias_residual_layernorm_fp8(*args, smooth=smooth)

    def bias_act_fp8(self, x, bias, act="gelu", smooth=None):
        return self.tri.bias_act_fp8(x, bias, act, smooth=smooth)

    def pool(self, x, cu_seqlens, mode, normalize, max_len):
        return self.tri.pool(x, cu_seqlens, mode, normalize, max_len)


_FLASH_STATE = {"contiguous": False}  # set once if this PyTorch's flash kernel rejects strided q/k/v views


def flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """Flash attention on packed documents; q, k, v ``[T, nh, hd]`` fp16/bf16 on CUDA, last dim contiguous.
    No host synchronization (CUDA-graph safe).

    Calls ``aten._flash_attention_forward``, the op that ``torch.nn.attention.varlen.varlen_attn`` runs on
    Hopper, directly: that wrapper is a ``torch.library`` custom op, and its first call in a process imports
    Dynamo, SymPy and FSDP, which would slow every Triton model instance's start."""
    kw = {} if abs(scale - q.shape[-1] ** -0.5) < 1e-9 else {"scale": scale}
    if _FLASH_STATE["contiguous"]:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    n = int(max_len)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, n, n, 0.0, False, False, **kw)[
            0
        ]

    try:
        return run(q, k, v)
    except RuntimeError as e:
        if _FLASH_STATE["contiguous"] or "stride" not in str(e).lower() and "contiguous" not in str(e).lower():
            raise
        logger.info("flash varlen attention needs contiguous q/k/v here (%s): copying them", e)
        _FLASH_STATE["contiguous"] = True
        return run(q.contiguous(), k.contiguous(), v.contiguous())


def select_kernels(name: str, device: torch.device) -> TorchKernels:
    """The kernel set for ``device``: ``auto`` | ``triton`` | ``cuda`` | ``torch`` (see module doc)."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"kernels {name!r} is not one of {', '.join(KERNEL_BACKENDS)}")
    if device.type != "cuda" or name == "torch":
        return TorchKernels()
    if name in ("auto", "triton"):
        try:
            return TritonKernels()
        except ImportError as e:
            if name == "triton":
                raise RuntimeError(
                    f"Triton-language kernels need the triton package ({e}): "
                    "pip install triton, or use kernels='cuda' or 'torch'"
                ) from None
            logger.info("triton is not importable (%s); trying the CUDA C++ library", e)
    from dll import cuda_lib

    lib = cuda_lib.load(device)
    if lib is not None:
        return CudaKernels(lib)
    if name == "cuda":
        raise RuntimeError(
            f"the CUDA C++ kernel library is not built for this GPU: run "
            f"`bash dll/build.sh` (looked in {cuda_lib.lib_path(device)})"
        )
    logger.warning("no Triton and no CUDA kernel library: the GPU engine runs the PyTorch twins (slower)")
    return TorchKernels()
