"""Pure-PyTorch twins of the fused kernels (``TorchKernels``): the same signatures and meaning as the CUDA
library (``dll.cuda_lib``) and the Triton-language kernels (``dll.triton_kernels``), used where those do not
apply and as their oracle in tests. ``ACTS`` maps an activation name to the kernels' code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ACTS", "FP8_MAX", "TorchKernels", "quantize_rows_fp8"]


FP8_MAX = 448.0  # largest finite float8_e4m3fn
ACTS = {"gelu": 0, "gelu_new": 1, "gelu_pytorch_tanh": 1, "relu": 2}  # activation name -> kernel code


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
    def embed_layernorm(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        word: torch.Tensor,
        posw: torch.Tensor,
        type0: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        """ids, pos int32 ``[T]``; word ``[V, H]``, posw ``[P, H]``, type0 ``[H]`` -> LN(sum) ``[T, H]`` word.dtype."""
        return self._embed32(ids, pos, word, posw, type0, gamma, beta, eps).to(word.dtype)

    def embed_layernorm_fp8(self, ids, pos, word, posw, type0, gamma, beta, eps, smooth=None):
        """As ``embed_layernorm``, also returning the output row-quantized: (y, q, scale)."""
        y = self._embed32(ids, pos, word, posw, type0, gamma, beta, eps)
        return (y.to(word.dtype), *quantize_rows_fp8(y, smooth))

    @staticmethod
    def _embed32(ids, pos, word, posw, type0, gamma, beta, eps) -> torch.Tensor:
        x = (
            word.index_select(0, ids.long()).float() + posw.index_select(0, pos.long()).float() + type0.float()[None]
        )  # [T, H]
        return _layer_norm32(x, gamma, beta, eps)

    # --- residual + LayerNorm ----------------------------------------------------------------
    def bias_residual_layernorm(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        residual: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
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
    def varlen_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, scale: float
    ) -> torch.Tensor:
        """Bidirectional attention within each packed document: q, k, v ``[T, nh, hd]`` -> ``[T, nh, hd]``.

        Twin: documents are gathered into a padded ``[N, nh, L, hd]`` batch with a key mask
        and run through SDPA (on the CPU, documents are grouped by length first so that
        short ones are not padded to the longest). Rows past ``cu_seqlens[-1]`` are zero.
        """
        out = torch.zeros((q.shape[0] + 1, *q.shape[1:]), dtype=q.dtype, device=q.device)  # + a dump row
        if q.device.type != "cpu":  # one padded batch: no host synchronization (graph-safe)
            self._attend(
                q,
                k,
                v,
                cu_seqlens[:-1].long(),
                cu_seqlens[1:].long() - cu_seqlens[:-1].long(),
                max(int(max_len), 1),
                scale,
                out,
            )
            return out[:-1]
        starts = cu_seqlens[:-1].long()
        lens = cu_seqlens[1:].long() - starts
        group = torch.ceil(torch.log2(lens.clamp(min=1).float())).long()  # length class per document
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
        valid = ar[None, :] < lens[:, None]  # [n, L]
        src = (starts[:, None] + ar[None, :]).clamp_(max=max(T - 1, 0)).reshape(-1)  # rows to read
        dst = torch.where(valid, starts[:, None] + ar[None, :], T).reshape(-1)  # rows to write

        def gather(t: torch.Tensor) -> torch.Tensor:  # [n, nh, L, hd]
            return t.index_select(0, src).reshape(n, L, nh, hd).transpose(1, 2)

        dt = torch.float32 if q.device.type == "cpu" else q.dtype
        o = F.scaled_dot_product_attention(
            gather(q).to(dt), gather(k).to(dt), gather(v).to(dt), attn_mask=valid[:, None, None, :], scale=scale
        )  # [n, nh, L, hd]
        out.index_copy_(0, dst, o.transpose(1, 2).reshape(n * L, nh, hd).to(q.dtype))

    # --- pooling -----------------------------------------------------------------------------
    def pool(self, x: torch.Tensor, cu_seqlens: torch.Tensor, mode: str, normalize: bool, max_len: int) -> torch.Tensor:
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
            seg = torch.repeat_interleave(torch.arange(n + 1, device=x.device), torch.cat([lens, rest]), output_size=T)
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
    def scaled_mm(
        self,
        a_q: torch.Tensor,
        a_scale: torch.Tensor,
        w_q: torch.Tensor,
        w_scale: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
        fast_accum: bool = True,
    ) -> torch.Tensor:
        """(a_q * a_scale) @ (w_q * w_scale)^T + bias: a_q ``[M, K]``, w_q ``[N, K]`` fp8, scales
        ``[M, 1]`` and ``[1, N]`` float32 -> ``[M, N]`` out_dtype (dequantize, then float32 matmul;
        ``fast_accum`` is the fp8 tensor cores' reduced-precision accumulation, ignored here)."""
        y = (a_q.float() * a_scale) @ (w_q.float() * w_scale.reshape(-1, 1)).t()
        if bias is not None:
            y = y + bias.float()[None]
        return y.to(out_dtype)
