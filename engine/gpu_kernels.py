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
import math

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["TorchKernels", "TritonKernels", "CudaKernels", "select_kernels", "KERNEL_BACKENDS", "ACTS",
           "quantize_rows_fp8", "FP8_MAX", "flash_varlen"]

KERNEL_BACKENDS = ("auto", "triton", "cuda", "torch")
ACTS = {"gelu": 0, "gelu_new": 1, "gelu_pytorch_tanh": 1, "relu": 2}  # activation name -> kernel code
FP8_MAX = 448.0  # largest finite float8_e4m3fn
POOL_MODES = {"mean": 0, "max": 1, "cls": 2}


def _act(x: torch.Tensor, act: str) -> torch.Tensor:
    """BERT's activation on float32 ``x`` (erf GELU, tanh GELU or ReLU)."""
    code = ACTS[act]
    if code == 0:
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if code == 1:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    return torch.relu(x)


def quantize_rows_fp8(y: torch.Tensor, smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float ``[R, C]`` (times ``smooth [C]``) -> (float8_e4m3fn ``[R, C]``, float32 scale ``[R, 1]``),
    per-row absmax scaling."""
    y = y.float() if smooth is None else y.float() * smooth.float()[None]
    scale = y.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    q = (y / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _layer_norm32(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim in float32 (biased variance, as BERT)."""
    mu = x.mean(-1, keepdim=True)
    d = x - mu
    var = (d * d).mean(-1, keepdim=True)
    return d * torch.rsqrt(var + eps) * gamma.float() + beta.float()


class TorchKernels:
    """The twins: plain PyTorch, float32 arithmetic, output in the input's dtype."""

    name = "torch"

    # --- embeddings --------------------------------------------------------------------------
    def embed_layernorm(self, ids: torch.Tensor, pos: torch.Tensor, word: torch.Tensor, posw: torch.Tensor,
                        type0: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
        """ids, pos int32 ``[T]``; word ``[V, H]``, posw ``[P, H]``, type0 ``[H]`` -> LN(sum) ``[T, H]`` word.dtype."""
        return self._embed32(ids, pos, word, posw, type0, gamma, beta, eps).to(word.dtype)

    def embed_layernorm_fp8(self, ids, pos, word, posw, type0, gamma, beta, eps, smooth=None):
        """As ``embed_layernorm``, also returning the output row-quantized: (y, q, scale)."""
        y = self._embed32(ids, pos, word, posw, type0, gamma, beta, eps)
        return (y.to(word.dtype), *quantize_rows_fp8(y, smooth))

    @staticmethod
    def _embed32(ids, pos, word, posw, type0, gamma, beta, eps) -> torch.Tensor:
        x = (word.index_select(0, ids.long()).float() + posw.index_select(0, pos.long()).float()
             + type0.float()[None])                                                  # [T, H]
        return _layer_norm32(x, gamma, beta, eps)

    # --- residual + LayerNorm ----------------------------------------------------------------
    def bias_residual_layernorm(self, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                                gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
        """LN(x + bias + residual) ``[T, H]``, in residual's dtype (x may be another float dtype);
        residual None: LN(x + bias) in x's dtype (the residual was added by the GEMM)."""
        return self._res32(x, bias, residual, gamma, beta, eps).to((x if residual is None else residual).dtype)

    def bias_residual_layernorm_fp8(self, x, bias, residual, gamma, beta, eps, smooth=None):
        """As ``bias_residual_layernorm``, also returning the output row-quantized: (y, q, scale)."""
        y = self._res32(x, bias, residual, gamma, beta, eps)
        return (y.to((x if residual is None else residual).dtype), *quantize_rows_fp8(y, smooth))

    @staticmethod
    def _res32(x, bias, residual, gamma, beta, eps) -> torch.Tensor:
        s = x.float() if residual is None else x.float() + residual.float()
        if bias is not None:
            s = s + bias.float()[None]
        return _layer_norm32(s, gamma, beta, eps)

    # --- bias + activation -------------------------------------------------------------------
    def bias_act(self, x: torch.Tensor, bias: torch.Tensor, act: str = "gelu") -> torch.Tensor:
        """act(x + bias) ``[T, I]`` in x's dtype; act is a BERT ``hidden_act`` name."""
        return _act(x.float() + bias.float()[None], act).to(x.dtype)

    def bias_act_fp8(self, x: torch.Tensor, bias: torch.Tensor, act: str = "gelu", smooth=None):
        """act(x + bias), row-quantized: (q ``[T, I]`` fp8, scale ``[T, 1]``). GELU takes its tanh form
        here for erf-GELU models too (the kernels' cheaper form; fp8 rounding is far coarser)."""
        return quantize_rows_fp8(_act(x.float() + bias.float()[None], "gelu_new" if act == "gelu" else act), smooth)

    # --- attention ---------------------------------------------------------------------------
    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_len: int, scale: float) -> torch.Tensor:
        """Bidirectional attention within each packed document: q, k, v ``[T, nh, hd]`` -> ``[T, nh, hd]``.

        Twin: documents are gathered into a padded ``[N, nh, L, hd]`` batch with a key mask
        and run through SDPA (on the CPU, documents are grouped by length first so that
        short ones are not padded to the longest). Rows past ``cu_seqlens[-1]`` are zero.
        """
        out = torch.zeros((q.shape[0] + 1, *q.shape[1:]), dtype=q.dtype, device=q.device)  # + a dump row
        if q.device.type != "cpu":        # one padded batch: no host synchronization (graph-safe)
            self._attend(q, k, v, cu_seqlens[:-1].long(), cu_seqlens[1:].long() - cu_seqlens[:-1].long(),
                         max(int(max_len), 1), scale, out)
            return out[:-1]
        starts = cu_seqlens[:-1].long()
        lens = cu_seqlens[1:].long() - starts
        group = torch.ceil(torch.log2(lens.clamp(min=1).float())).long()          # length class per document
        for g in torch.unique(group).tolist():
            sel = (group == g).nonzero().flatten()
            self._attend(q, k, v, starts[sel], lens[sel], int(lens[sel].max().clamp(min=1)), scale, out)
        return out[:-1]

    @staticmethod
    def _attend(q, k, v, starts, lens, L: int, scale: float, out: torch.Tensor) -> None:
        """Padded SDPA over the documents (starts, lens), each <= L long; writes their rows of
        ``out [T + 1, nh, hd]`` (padding rows land in the last row, no host synchronization)."""
        T, nh, hd = q.shape
        n = starts.numel()
        ar = torch.arange(L, device=q.device)
        valid = ar[None, :] < lens[:, None]                                          # [n, L]
        src = (starts[:, None] + ar[None, :]).clamp_(max=max(T - 1, 0)).reshape(-1)  # rows to read
        dst = torch.where(valid, starts[:, None] + ar[None, :], T).reshape(-1)         # rows to write

        def gather(t: torch.Tensor) -> torch.Tensor:                                # [n, nh, L, hd]
            return t.index_select(0, src).reshape(n, L, nh, hd).transpose(1, 2)

        dt = torch.float32 if q.device.type == "cpu" else q.dtype
        o = F.scaled_dot_product_attention(gather(q).to(dt), gather(k).to(dt), gather(v).to(dt),
                                           attn_mask=valid[:, None, None, :], scale=scale)  # [n, nh, L, hd]
        out.index_copy_(0, dst, o.transpose(1, 2).reshape(n * L, nh, hd).to(q.dtype))

    # --- pooling -----------------------------------------------------------------------------
    def pool(self, x: torch.Tensor, cu_seqlens: torch.Tensor, mode: str, normalize: bool,
             max_len: int) -> torch.Tensor:
        """Per-document pooling of ``x [T, H]`` -> float32 ``[N, H]``, L2-normalized when asked.

        mode mean | max | cls; ``max_len`` >= every document's length. An empty document
        (length 0) pools to zeros.
        """
        T, H = x.shape
        n = cu_seqlens.numel() - 1
        starts = cu_seqlens[:-1].long()
        lens = cu_seqlens[1:].long() - starts
        xf = x.float()
        if mode == "cls":
            out = xf.index_select(0, starts.clamp(max=max(T - 1, 0))) * (lens > 0).float()[:, None]
        else:
            # rows past cu[-1] go to an extra segment n, dropped below (no host synchronization)
            rest = (T - cu_seqlens[-1:].long()).clamp(min=0)
            seg = torch.repeat_interleave(torch.arange(n + 1, device=x.device), torch.cat([lens, rest]),
                                          output_size=T)
            out = torch.zeros(n + 1, H, dtype=torch.float32, device=x.device)
            if mode == "mean":
                out.index_add_(0, seg, xf)
                out = out[:n] / lens.clamp(min=1).float()[:, None]
            elif mode == "max":
                out.scatter_reduce_(0, seg[:, None].expand(-1, H), xf, reduce="amax", include_self=False)
                out = out[:n]
            else:
                raise ValueError(f"unknown pooling mode {mode!r} (mean, max, cls)")
        if normalize:
            out = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return out

    # --- fp8 matrix product ------------------------------------------------------------------
    def scaled_mm(self, a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool = True) -> torch.Tensor:
        """(a_q * a_scale) @ (w_q * w_scale)^T + bias: a_q ``[M, K]``, w_q ``[N, K]`` fp8, scales
        ``[M, 1]`` and ``[1, N]`` float32 -> ``[M, N]`` out_dtype (dequantize, then float32 matmul;
        ``fast_accum`` is the fp8 tensor cores' reduced-precision accumulation, ignored here)."""
        y = (a_q.float() * a_scale) @ (w_q.float() * w_scale.reshape(-1, 1)).t()
        if bias is not None:
            y = y + bias.float()[None]
        return y.to(out_dtype)


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
        self.fuse_bias: dict[bool, bool] = {}   # fast_accum -> bias fused in the GEMM

    def mm(self, a_q, a_scale, w_q, w_scale, bias, out_dtype, fast_accum: bool = True):
        def call(b):
            return torch._scaled_mm(a_q, w_q.t(), scale_a=a_scale, scale_b=w_scale, bias=b, out_dtype=out_dtype,
                                    use_fast_accum=fast_accum)

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


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                 scale: float) -> torch.Tensor:
    """Flash attention on packed documents; q, k, v ``[T, nh, hd]`` fp16/bf16 on CUDA, last dim contiguous.
    No host synchronization (CUDA-graph safe).

    Calls ``aten._flash_attention_forward``, the op that ``torch.nn.attention.varlen.varlen_attn`` runs on
    Hopper, directly: that wrapper is a ``torch.library`` custom op, and its first call in a process imports
    Dynamo, SymPy and FSDP, about 1.5 s of every Triton model instance's start on the H200 hosts."""
    kw = {} if abs(scale - q.shape[-1] ** -0.5) < 1e-9 else {"scale": scale}
    if _FLASH_STATE["contiguous"]:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    n = int(max_len)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, n, n, 0.0, False, False,
                                                       **kw)[0]

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
                raise RuntimeError(f"Triton-language kernels need the triton package ({e}): "
                                   "pip install triton, or use kernels='cuda' or 'torch'") from None
            logger.info("triton is not importable (%s); trying the CUDA C++ library", e)
    from dll import cuda_lib

    lib = cuda_lib.load(device)
    if lib is not None:
        return CudaKernels(lib)
    if name == "cuda":
        raise RuntimeError(f"the CUDA C++ kernel library is not built for this GPU: run "
                           f"`bash dll/build.sh` (looked in {cuda_lib.lib_path(device)})")
    logger.warning("no Triton and no CUDA kernel library: the GPU engine runs the PyTorch twins (slower)")
    return TorchKernels()
