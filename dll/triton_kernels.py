"""Triton-language fused kernels of the GPU engine (import only where ``triton`` is installed).

Each public function here has a twin of the same name and meaning in
``engine.gpu_kernels.TorchKernels``; the tests compare the two on random shapes and dtypes.
All arithmetic is float32 in registers; inputs and outputs are fp16 / bf16 / fp32 as given.
Every kernel is memory-bound: one read of each input, one write of each output.

Shapes: ``T`` packed tokens, ``H`` hidden size, ``I`` FFN width, ``N`` documents.
With ``fp8=True`` a kernel also writes its output row-quantized to float8_e4m3fn with a
float32 scale per row (``scale = max|row| / 448``) for the next fp8 matrix product; with
``smooth`` (float32 ``[C]``) the row is multiplied by it first (SmoothQuant-style).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

__all__ = ["embed_layernorm", "residual_layernorm", "bias_act", "pool"]

FP8_DTYPE = torch.float8_e4m3fn


@triton.jit
def _row_tile(T, C, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile of a row-major ``[T, C]`` matrix: its rows, columns, their masks and the tile's."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    rm = rows < T
    cm = cols < C
    return rows, cols, rm, cm, rm[:, None] & cm[None, :]


@triton.jit
def _ln_store(
    x, rows, cols, rm, cm, H, eps, g_ptr, b_ptr, y_ptr, q_ptr, s_ptr, sm_ptr, FP8: tl.constexpr, SMOOTH: tl.constexpr
):
    """LayerNorm of the float32 tile ``x [ROWS, BLOCK_H]`` (masked), then store y (and q, scale)."""
    m = rm[:, None] & cm[None, :]
    mean = tl.sum(x, axis=1) / H
    d = tl.where(m, x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    g = tl.load(g_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * g[None, :] + b[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)
    if FP8:
        _quant_store(y, offs, rows, cols, rm, cm, q_ptr, s_ptr, sm_ptr, SMOOTH)


@triton.jit
def _quant_store(y, offs, rows, cols, rm, cm, q_ptr, s_ptr, sm_ptr, SMOOTH: tl.constexpr):
    """Row-quantize the float32 tile ``y`` (times smooth[cols] if SMOOTH) to fp8, with one scale per row."""
    m = rm[:, None] & cm[None, :]
    if SMOOTH:
        y = y * tl.load(sm_ptr + cols, mask=cm, other=0.0)[None, :]
    amax = tl.max(tl.where(m, tl.abs(y), 0.0), axis=1)
    scale = tl.maximum(amax, 1e-12) / 448.0
    q = tl.minimum(tl.maximum(y / scale[:, None], -448.0), 448.0)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + rows, scale, mask=rm)


@triton.jit
def _embed_ln_kernel(
    ids_ptr,
    pos_ptr,
    word_ptr,
    posw_ptr,
    type_ptr,
    g_ptr,
    b_ptr,
    y_ptr,
    q_ptr,
    s_ptr,
    sm_ptr,
    T,
    H,
    eps,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    FP8: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    rows, cols, rm, cm, m = _row_tile(T, H, ROWS, BLOCK_H)
    tok = tl.load(ids_ptr + rows, mask=rm, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + rows, mask=rm, other=0).to(tl.int64)
    x = tl.load(word_ptr + tok[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
    x += tl.load(posw_ptr + pos[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
    x += tl.load(type_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    _ln_store(x, rows, cols, rm, cm, H, eps, g_ptr, b_ptr, y_ptr, q_ptr, s_ptr, sm_ptr, FP8, SMOOTH)


@triton.jit
def _residual_ln_kernel(
    x_ptr,
    bias_ptr,
    r_ptr,
    g_ptr,
    b_ptr,
    y_ptr,
    q_ptr,
    s_ptr,
    sm_ptr,
    T,
    H,
    eps,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    FP8: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    rows, cols, rm, cm, m = _row_tile(T, H, ROWS, BLOCK_H)
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    _ln_store(x, rows, cols, rm, cm, H, eps, g_ptr, b_ptr, y_ptr, q_ptr, s_ptr, sm_ptr, FP8, SMOOTH)


@triton.jit
def _gelu_tanh_fast(x):
    """GELU in its tanh form, as x * sigmoid(2z) = x / (1 + 2^(-2 z log2 e)) with z = sqrt(2/pi) (x +
    0.044715 x^3): one exp2 and one fast division, no ``1 + tanh`` cancellation in the negative tail.
    The fp8 path uses it for erf-GELU models too (as the 16-bit path's cuBLASLt epilogue does): the
    erf polynomial made that kernel compute-bound (BENCHMARKS.md, fp8)."""
    e = tl.exp2(-2.3022082 * (x + 0.044715 * x * x * x))
    return tl.fdiv(x, 1.0 + e)


@triton.jit
def _bias_act_kernel(
    x_ptr,
    bias_ptr,
    y_ptr,
    q_ptr,
    s_ptr,
    sm_ptr,
    T,
    C,
    ACT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FP8: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    rows, cols, rm, cm, m = _row_tile(T, C, ROWS, BLOCK_C)
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    x += tl.load(bias_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    if FP8 and ACT != 2:
        y = _gelu_tanh_fast(x)
    elif ACT == 0:  # erf GELU (BERT's "gelu"); erf by Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7, about
        # a fifth of libdevice erf's instructions: the kernel stays memory-bound)
        z = tl.abs(x) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.3275911 * z)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        erf_abs = 1.0 - poly * tl.exp2(-1.4426950408889634 * z * z)
        y = 0.5 * x * (1.0 + tl.where(x >= 0, erf_abs, -erf_abs))
    elif ACT == 1:  # tanh GELU ("gelu_new"); tanh(z) = 1 - 2 / (exp(2z) + 1)
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
    else:  # relu
        y = tl.maximum(x, 0.0)
    if FP8:
        _quant_store(y, offs, rows, cols, rm, cm, q_ptr, s_ptr, sm_ptr, SMOOTH)
    else:
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pool_kernel(
    x_ptr,
    cu_ptr,
    out_ptr,
    H,
    N_BLOCKS: tl.constexpr,
    MODE: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program per document: rows cu[b]..cu[b+1] of x -> out[b] (float32); every length <= N_BLOCKS * BLOCK_R."""
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    n = end - start
    cols = tl.arange(0, BLOCK_H)
    cm = cols < H
    if MODE == 2:  # cls: the document's first row
        acc = tl.load(x_ptr + start.to(tl.int64) * H + cols, mask=cm & (n > 0), other=0.0).to(tl.float32)
    else:
        if MODE == 0:
            tile = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
        else:
            tile = tl.full([BLOCK_R, BLOCK_H], float("-inf"), dtype=tl.float32)
        for i in range(N_BLOCKS):  # a compile-time trip count (Triton's interpreter needs one)
            rows = start + i * BLOCK_R + tl.arange(0, BLOCK_R)
            m = (rows < end)[:, None] & cm[None, :]
            offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
            if MODE == 0:
                tile += tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            else:
                tile = tl.maximum(tile, tl.load(x_ptr + offs, mask=m, other=float("-inf")).to(tl.float32))
        if MODE == 0:
            acc = tl.sum(tile, axis=0) / tl.maximum(n, 1).to(tl.float32)
        else:
            acc = tl.where(cm & (n > 0), tl.max(tile, axis=0), 0.0)
    if NORM:
        nrm = tl.sqrt(tl.sum(acc * acc, axis=0))
        acc = acc / tl.maximum(nrm, 1e-12)
    tl.store(out_ptr + b.to(tl.int64) * H + cols, acc, mask=cm)


def _rows_and_warps(block: int, target: int = 2048) -> tuple[int, int]:
    """Rows per program so that a tile holds about ``target`` elements; warps for that tile."""
    rows = max(1, target // block)
    tile = rows * block
    return rows, (8 if tile >= 4096 else 4)


def embed_layernorm(ids, pos, word, posw, type0, gamma, beta, eps: float, fp8: bool = False, smooth=None):
    """LN(word[ids] + posw[pos] + type0) -> (y ``[T, H]`` word.dtype, q | None, scale | None)."""
    T, H = ids.shape[0], word.shape[1]
    y = torch.empty(T, H, dtype=word.dtype, device=word.device)
    q = torch.empty(T, H, dtype=FP8_DTYPE, device=word.device) if fp8 else y
    s = torch.empty(T, 1, dtype=torch.float32, device=word.device) if fp8 else gamma
    block = triton.next_power_of_2(H)
    rows, warps = _rows_and_warps(block)
    _embed_ln_kernel[(triton.cdiv(T, rows),)](
        ids,
        pos,
        word,
        posw,
        type0,
        gamma,
        beta,
        y,
        q,
        s,
        gamma if smooth is None else smooth,
        T,
        H,
        eps,
        ROWS=rows,
        BLOCK_H=block,
        FP8=fp8,
        SMOOTH=smooth is not None,
        num_warps=warps,
    )
    return (y, q, s) if fp8 else (y, None, None)


def residual_layernorm(x, bias, residual, gamma, beta, eps: float, fp8: bool = False, smooth=None):
    """LN(x + bias + residual) -> (y ``[T, H]`` residual.dtype (x.dtype without residual), q | None, scale | None)."""
    T, H = x.shape
    y = torch.empty_like(x if residual is None else residual)
    q = torch.empty(T, H, dtype=FP8_DTYPE, device=x.device) if fp8 else y
    s = torch.empty(T, 1, dtype=torch.float32, device=x.device) if fp8 else gamma
    block = triton.next_power_of_2(H)
    rows, warps = _rows_and_warps(block)
    _residual_ln_kernel[(triton.cdiv(T, rows),)](
        x,
        gamma if bias is None else bias,
        x if residual is None else residual,
        gamma,
        beta,
        y,
        q,
        s,
        gamma if smooth is None else smooth,
        T,
        H,
        eps,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        ROWS=rows,
        BLOCK_H=block,
        FP8=fp8,
        SMOOTH=smooth is not None,
        num_warps=warps,
    )
    return (y, q, s) if fp8 else (y, None, None)


def bias_act(x, bias, act: int, fp8: bool = False, smooth=None):
    """act(x + bias) -> (y ``[T, C]`` x.dtype | None, q | None, scale | None); act 0 gelu, 1 tanh-gelu, 2 relu
    (with ``fp8`` both GELUs take the tanh form, see ``_gelu_tanh_fast``)."""
    T, C = x.shape
    if fp8:
        q = torch.empty(T, C, dtype=FP8_DTYPE, device=x.device)
        s = torch.empty(T, 1, dtype=torch.float32, device=x.device)
        y = q
    else:
        y = torch.empty_like(x)
        q, s = y, bias
    block = triton.next_power_of_2(C)
    rows, warps = _rows_and_warps(block, 4096)
    _bias_act_kernel[(triton.cdiv(T, rows),)](
        x,
        bias,
        y,
        q,
        s,
        bias if smooth is None else smooth,
        T,
        C,
        ACT=act,
        ROWS=rows,
        BLOCK_C=block,
        FP8=fp8,
        SMOOTH=smooth is not None,
        num_warps=warps,
    )
    return (None, q, s) if fp8 else (y, None, None)


def pool(x, cu_seqlens, mode: int, normalize: bool, max_len: int):
    """Per-document pooling of ``x [T, H]`` -> float32 ``[N, H]``; mode 0 mean, 1 max, 2 cls.

    ``max_len`` bounds every document's length (the loop runs ``max_len / BLOCK_R`` steps)."""
    H = x.shape[1]
    n = cu_seqlens.shape[0] - 1
    out = torch.empty(n, H, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(H)
    block_r = max(1, 4096 // block)
    _pool_kernel[(n,)](
        x,
        cu_seqlens,
        out,
        H,
        N_BLOCKS=triton.cdiv(max(max_len, 1), block_r),
        MODE=mode,
        NORM=normalize,
        BLOCK_R=block_r,
        BLOCK_H=block,
        num_warps=4,
    )
    return out
