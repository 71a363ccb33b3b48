"""The GPU engine: BERT on packed, unpadded tokens in PyTorch, with fused kernels and CUDA graphs.

    engine = load_gpu_engine(folder, meta)            # a folder built with --target gpu
    vectors = engine.embed(token_ids, lengths)        # int32 [T] packed, int32 [N] -> float32 [N, dim]

One forward pass over a chunk of documents (shapes: ``T`` tokens, ``N`` documents,
``H`` hidden, ``I`` FFN width, ``nh`` heads, ``hd`` head size):

    x = LN(word[ids] + pos[p] + type[0])                       fused kernel        [T, H]
    per layer:
      qkv = x @ Wqkv^T + bqkv                                  one cuBLAS GEMM     [T, 3H]
      ctx = flash varlen attention within each document        cu_seqlens [N + 1]  [T, H]
      x   = LN(ctx @ Wo^T + bo + x)                            GEMM + fused kernel
      h   = act(x @ W1^T + b1)                                 GEMM with cuBLASLt bias+GELU epilogue
                                                               (or GEMM + fused kernel)  [T, I]
      x   = LN(h @ W2^T + b2 + x)                              GEMM + fused kernel
    out = pool(x) per document, L2-normalized when asked      fused kernel        [N, H] float32

No padding is computed except the few tokens that round a chunk up to a CUDA-graph bucket.
Precisions: fp16 / bf16 (cuBLAS with float32 accumulation), fp8 (Hopper / Ada: the QKV and
FFN GEMMs take float8_e4m3fn operands with per-token and per-channel scales via
``torch._scaled_mm``, optional SmoothQuant factors; activations bf16), fp32. On the CPU the
same code runs the PyTorch twins in fp32 (fp8 is emulated there: quantized GEMM operands).

CUDA graphs: each chunk is padded to a static shape ``(T_b, N_b, L_b)`` (tokens rounded up by
at most a quarter octave, documents and the longest length to a power of two); the padding
tokens form dummy documents, so every row holds finite numbers, and their pooled rows are
dropped. One graph is captured per shape the first time it is seen (kept LRU, ``max_graphs``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dll.twins import ACTS, FP8_MAX
from engine.base import packed_inputs
from engine.checkpoint import BertShape
from engine.gpu_kernels import select_kernels

logger = logging.getLogger(__name__)

__all__ = ["GpuOptions", "GpuBertEngine", "load_gpu_engine", "token_bucket", "static_plan"]


@dataclass(frozen=True)
class GpuOptions:
    """How the GPU engine runs. ``gelu_epilogue`` and ``fp8`` choices change numbers slightly."""

    kernels: str = "auto"  # auto | triton | cuda | torch (see engine.gpu_kernels)
    cuda_graphs: bool = True  # capture one CUDA graph per padded shape (CUDA only)
    max_tokens: int = 32768  # tokens per forward pass; longer inputs are cut between documents
    max_docs: int = 2048  # documents per forward pass
    max_graphs: int = 64  # captured graphs kept (least recently used dropped)
    gelu_epilogue: bool = True  # fp16/bf16: bias + GELU in the cuBLASLt GEMM epilogue (its GELU is the tanh
    # form, close enough to erf-GELU models' outputs); False: exact erf kernel.
    # fp8: the fused bias+GELU+quantize kernel always uses the tanh form
    fp8_gemms: str = "qkv,ffn1,ffn2"  # which GEMMs take fp8 operands at precision fp8 (others bf16)
    fp8_fast_accum: bool = True  # Hopper fp8 fast accumulation (faster, slightly less exact)
    fp8_smooth: float = 0.5  # SmoothQuant alpha for fp8 activations (0 = off; needs calibration tokens)
    residual_in_gemm: bool = False  # fp16/bf16 GEMMs add the residual in their epilogue (x += a @ W^T)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> GpuOptions:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


@dataclass
class _Layer:
    """One encoder layer's tensors on the device. An fp8 GEMM holds float8_e4m3fn weights with
    a per-output-channel scale ``[1, out]`` and the per-input-channel ``smooth`` factor that
    the kernel producing its input multiplies in before quantizing (None: no smoothing)."""

    wqkv: torch.Tensor  # [3H, H]
    bqkv: torch.Tensor  # [3H]
    wo: torch.Tensor  # [H, H]
    bo: torch.Tensor  # [H]
    ln1_g: torch.Tensor  # [H] float32
    ln1_b: torch.Tensor
    w1: torch.Tensor  # [I, H]
    b1: torch.Tensor  # [I]
    w2: torch.Tensor  # [H, I]
    b2: torch.Tensor  # [H]
    ln2_g: torch.Tensor
    ln2_b: torch.Tensor
    fp8: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # name (qkv | ffn1 | ffn2) -> (fp8 weight, scale [1, out], smooth [in] | None)


def token_bucket(t: int, cap: int) -> int:
    """``t`` tokens rounded up to a bucket: 64, then steps of a quarter octave (<= 25% padding), <= cap."""
    if t <= 64:
        b = 64
    else:
        step = 1 << max(4, (t - 1).bit_length() - 3)
        b = -(-t // step) * step
    return max(t, min(b, cap))


def static_plan(lens: np.ndarray, t_cap: int, max_seq_len: int) -> tuple[int, int, np.ndarray]:
    """Padded static shape of a chunk: (T_b tokens, L_b longest length, lengths ``[N_b]``).

    The real lengths come first; the ``T_b - T`` padding tokens follow as dummy documents of at
    most ``L_b`` tokens; the rest are empty documents, so ``N_b`` is a power of two (>= 8).
    """
    T, N, L = int(lens.sum()), int(lens.size), int(lens.max())
    Tb = token_bucket(T, t_cap)
    Lb = min(_pow2(max(L, 16)), max(max_seq_len, L))
    pad = Tb - T
    n_dummy = -(-pad // Lb)
    out = np.zeros(max(8, _pow2(N + n_dummy)), dtype=np.int32)
    out[:N] = lens
    if n_dummy:
        out[N : N + n_dummy] = Lb
        out[N + n_dummy - 1] = pad - Lb * (n_dummy - 1)
    return Tb, Lb, out


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[out, in]`` -> (float8_e4m3fn ``[out, in]``, float32 per-output-channel scale ``[1, out]``)."""
    w32 = w.float()
    scale = w32.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX  # [out, 1]
    q = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.contiguous(), scale.reshape(1, -1).contiguous()


class GpuBertEngine:
    """``embed(token_ids, lengths) -> float32 [N, dim]`` on packed tokens (the ``Engine`` protocol)."""

    def __init__(
        self,
        shape: BertShape,
        weights: dict[str, Any],
        *,
        pooling: str,
        normalize: bool,
        max_seq_len: int,
        precision: str = "fp16",
        device: str | torch.device | None = None,
        options: GpuOptions | None = None,
        calibration: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.shape, self.pooling, self.normalize, self.max_seq_len = shape, pooling, normalize, max_seq_len
        self.options = opts = options or GpuOptions()
        if pooling not in ("mean", "max", "cls", "pooler"):
            raise ValueError(f"unknown pooling {pooling!r} (mean, max, cls, pooler)")
        if shape.hidden_act not in ACTS:
            raise ValueError(f"hidden_act {shape.hidden_act!r} is not supported ({', '.join(ACTS)})")
        if max_seq_len > shape.max_position:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds max_position_embeddings {shape.max_position}")
        dev = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.precision = precision
        if dev.type == "cpu" and precision not in ("fp32", "fp8"):
            logger.warning("precision %s needs a GPU; running the fp32 PyTorch twins on the CPU", precision)
            self.precision = "fp32"
        if self.precision == "fp8" and dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
            raise ValueError(
                f"fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                f"{torch.cuda.get_device_name(dev)} is {torch.cuda.get_device_capability(dev)}: "
                "use fp16 or bf16"
            )
        self.fp8_gemms = set(opts.fp8_gemms.split(",")) - {""} if self.precision == "fp8" else set()
        if self.fp8_gemms - {"qkv", "ffn1", "ffn2"}:
            raise ValueError(f"fp8_gemms {opts.fp8_gemms!r}: choose among qkv, ffn1, ffn2")
        self.fp8 = False  # set once the fp8 weights exist (the calibration pass runs in bf16)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp32": torch.float32}.get(
            self.precision
        )
        if dev.type == "cpu" and self.precision == "fp8":  # emulated: fp8 GEMM operands, fp32 elsewhere
            dtype = torch.float32
        if dtype is None:
            raise ValueError(f"precision {precision!r} is not available on the GPU engine (fp16, bf16, fp8, fp32)")
        self.dtype: torch.dtype = dtype
        self.kernels = select_kernels(opts.kernels, dev)
        self.dim, self.vocab_size = shape.hidden_size, shape.vocab_size
        self.scale = 1.0 / math.sqrt(shape.head_dim)
        self.use_graphs = opts.cuda_graphs and dev.type == "cuda"
        self.max_tokens = max(opts.max_tokens, max_seq_len) if dev.type == "cuda" else min(opts.max_tokens, 4096)
        self._load_weights(weights)
        self._recorder: dict[tuple[int, str], torch.Tensor] | None = None
        if self.fp8_gemms:
            smooth = self._calibrate(*calibration) if calibration is not None and opts.fp8_smooth > 0 else {}
            self._quantize_layers(smooth)
        self._lock = threading.Lock()
        self._graphs: OrderedDict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = OrderedDict()
        self._pad_static = False  # tests: pad to the graph shapes without graphs (on the CPU too)
        self.captures, self.capture_s = 0, 0.0  # graphs captured so far, and the seconds it took
        if self.use_graphs:
            self._alloc_static()
        logger.info(
            "GPU engine on %s: %s, kernels %s, graphs %s, %d layers, H=%d",
            dev,
            self.precision,
            self.kernels.name,
            self.use_graphs,
            shape.num_layers,
            shape.hidden_size,
        )

    # --- weights -----------------------------------------------------------------------------
    def _load_weights(self, w: dict[str, Any]) -> None:
        dev, dt = self.device, self.dtype

        def get(name: str, dtype: torch.dtype = dt) -> torch.Tensor:
            v = w[name]
            t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
            return t.to(device=dev, dtype=dtype).contiguous()

        f32 = torch.float32
        self.word = get("embeddings.word_embeddings.weight")  # [V, H]
        self.posw = get("embeddings.position_embeddings.weight")  # [P, H]
        self.type0 = get("embeddings.token_type_embeddings.weight")[0].contiguous()  # [H]
        self.emb_g, self.emb_b = get("embeddings.LayerNorm.weight", f32), get("embeddings.LayerNorm.bias", f32)
        self.layers: list[_Layer] = []
        for i in range(self.shape.num_layers):
            p = f"encoder.layer.{i}."
            a = p + "attention.self."
            wqkv = torch.cat([get(a + n + ".weight") for n in ("query", "key", "value")])  # [3H, H]
            bqkv = torch.cat([get(a + n + ".bias") for n in ("query", "key", "value")])
            self.layers.append(
                _Layer(
                    wqkv,
                    bqkv,
                    get(p + "attention.output.dense.weight"),
                    get(p + "attention.output.dense.bias"),
                    get(p + "attention.output.LayerNorm.weight", f32),
                    get(p + "attention.output.LayerNorm.bias", f32),
                    get(p + "intermediate.dense.weight"),
                    get(p + "intermediate.dense.bias"),
                    get(p + "output.dense.weight"),
                    get(p + "output.dense.bias"),
                    get(p + "output.LayerNorm.weight", f32),
                    get(p + "output.LayerNorm.bias", f32),
                )
            )
        if self.pooling == "pooler":
            if "pooler.dense.weight" not in w:
                raise ValueError("pooling 'pooler' needs pooler.dense weights, which this model lacks")
            self.wp, self.bp = get("pooler.dense.weight", f32), get("pooler.dense.bias", f32)

    # --- fp8 ---------------------------------------------------------------------------------
    def _calibrate(self, token_ids: np.ndarray, lengths: np.ndarray) -> dict[tuple[int, str], torch.Tensor]:
        """Per-input-channel SmoothQuant factors for each fp8 GEMM from a bf16 pass over real text:
        ``smooth_j = max|W_j|^(1-a) / max|x_j|^a`` (a = fp8_smooth), so x * smooth and W / smooth
        have balanced ranges and the product is unchanged."""
        alpha = self.options.fp8_smooth
        self._recorder = {}
        try:
            offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            with torch.inference_mode():
                for a, b in self._chunks(offsets):
                    ids, lens = token_ids[offsets[a] : offsets[b]].astype(np.int32), lengths[a:b].astype(np.int32)
                    cu = np.zeros(len(lens) + 1, dtype=np.int32)
                    np.cumsum(lens, out=cu[1:])
                    pos = np.arange(len(ids), dtype=np.int32) - np.repeat(cu[:-1], lens)
                    ids_t, pos_t, cu_t = (torch.from_numpy(v).to(self.device) for v in (ids, pos, cu))
                    self.forward(ids_t, pos_t, cu_t, int(lens.max()))
            amax = self._recorder
        finally:
            self._recorder = None
        weights = {"qkv": lambda L: L.wqkv, "ffn1": lambda L: L.w1, "ffn2": lambda L: L.w2}
        out = {}
        for (i, name), xmax in amax.items():
            if name in self.fp8_gemms:
                wmax = weights[name](self.layers[i]).float().abs().amax(0)  # [in]
                out[(i, name)] = (
                    (wmax.clamp_min(1e-5) ** (1 - alpha) / xmax.clamp_min(1e-5) ** alpha).clamp(1e-2, 1e2).contiguous()
                )
        logger.info("fp8 smoothing calibrated on %d tokens (alpha %.2f)", int(lengths.sum()), alpha)
        return out

    def _quantize_layers(self, smooth: dict[tuple[int, str], torch.Tensor]) -> None:
        """fp8 weights (per-output-channel scales) for the chosen GEMMs, with smoothing folded in."""
        for i, L in enumerate(self.layers):
            for name, w in (("qkv", L.wqkv), ("ffn1", L.w1), ("ffn2", L.w2)):
                if name in self.fp8_gemms:
                    sm = smooth.get((i, name))
                    w32 = w.float() if sm is None else w.float() / sm[None, :]
                    L.fp8[name] = (*_quantize_weight(w32), sm)
            if "qkv" in self.fp8_gemms:
                L.wqkv = L.wqkv[:0]  # free the bf16 copies the fp8 GEMMs replace
            if "ffn1" in self.fp8_gemms:
                L.w1 = L.w1[:0]
            if "ffn2" in self.fp8_gemms:
                L.w2 = L.w2[:0]
        self.fp8 = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _record(self, i: int, name: str, x: torch.Tensor) -> None:
        if self._recorder is not None:
            m = x.float().abs().amax(0)
            key = (i, name)
            self._recorder[key] = m if key not in self._recorder else torch.maximum(self._recorder[key], m)

    # --- the forward pass (device only, no host synchronization: graph-capturable) ------------
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        """ids, pos int32 ``[T]``, cu int32 ``[N + 1]``, ``max_len`` >= every length -> float32 ``[N, H]``."""
        k, s, dt = self.kernels, self.shape, self.dtype
        T, H, eps = ids.shape[0], s.hidden_size, s.layer_norm_eps
        act, layers = s.hidden_act, self.layers
        fast = self.options.fp8_fast_accum
        cuda = self.device.type == "cuda"
        epilogue = self.options.gelu_epilogue and act != "relu" and cuda
        res_gemm = self.options.residual_in_gemm and cuda and self._recorder is None

        def fp8_in(i: int, name: str):  # (weight, scale, smooth) when layer i's GEMM `name` runs in fp8
            return layers[i].fp8.get(name) if self.fp8 and i < len(layers) else None

        def make_ln(f, *args, nxt):  # LayerNorm, also quantizing its output for an fp8 consumer
            if nxt is None:
                return f(*args), None, None
            return getattr(k, f.__name__ + "_fp8")(*args, smooth=nxt[2])

        x, xq, xs = make_ln(
            k.embed_layernorm,
            ids,
            pos,
            self.word,
            self.posw,
            self.type0,
            self.emb_g,
            self.emb_b,
            eps,
            nxt=fp8_in(0, "qkv"),
        )
        for i, L in enumerate(layers):
            self._record(i, "qkv", x)
            f8 = fp8_in(i, "qkv")
            qkv = k.scaled_mm(xq, xs, f8[0], f8[1], L.bqkv, dt, fast) if f8 else F.linear(x, L.wqkv, L.bqkv)
            qkv = qkv.view(T, 3, s.num_heads, s.head_dim)  # [T, 3, nh, hd]
            ctx = k.varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, max_len, self.scale).reshape(T, H)
            if res_gemm:  # x + ctx @ Wo^T, in place
                a, res = x.addmm_(ctx, L.wo.t()), None
            else:
                a, res = F.linear(ctx, L.wo), x  # bias in the LN
            x, xq, xs = make_ln(k.bias_residual_layernorm, a, L.bo, res, L.ln1_g, L.ln1_b, eps, nxt=fp8_in(i, "ffn1"))
            self._record(i, "ffn1", x)
            f8, f8_out = fp8_in(i, "ffn1"), fp8_in(i, "ffn2")
            need_act = True
            if f8:
                h = k.scaled_mm(xq, xs, f8[0], f8[1], None, dt, fast)  # [T, I]
            elif epilogue and not f8_out and self._recorder is None:
                h = torch._addmm_activation(L.b1, x, L.w1.t(), use_gelu=True)  # bias + GELU fused
                need_act = False
            else:
                h = F.linear(x, L.w1)
            res = x
            if f8_out:
                hq, hs = k.bias_act_fp8(h, L.b1, act, smooth=f8_out[2])
                f = k.scaled_mm(hq, hs, f8_out[0], f8_out[1], None, dt, fast)  # [T, H]
            else:
                if need_act:
                    h = k.bias_act(h, L.b1, act)
                    self._record(i, "ffn2", h)
                if res_gemm:
                    f, res = x.addmm_(h, L.w2.t()), None  # x + h @ W2^T, in place
                else:
                    f = F.linear(h, L.w2)
            x, xq, xs = make_ln(
                k.bias_residual_layernorm, f, L.b2, res, L.ln2_g, L.ln2_b, eps, nxt=fp8_in(i + 1, "qkv")
            )
        if self.pooling == "pooler":
            out = torch.tanh(F.linear(k.pool(x, cu, "cls", False, max_len), self.wp, self.bp))
            return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12) if self.normalize else out
        return k.pool(x, cu, self.pooling, self.normalize, max_len)

    # --- host side -----------------------------------------------------------------------------
    def embed(self, token_ids: np.ndarray, lengths: np.ndarray, out_dtype: Any = np.float32) -> np.ndarray:
        """Packed token ids int32 ``[T]`` + lengths int32 ``[N]`` -> ``[N, dim]`` of ``out_dtype`` (float32, or
        float16 for a server whose outputs are fp16: rounded on the device, so half the bytes cross to the host,
        the same values as rounding the float32 rows there)."""
        token_ids, lengths, offsets = packed_inputs(token_ids, lengths, self.max_seq_len, self.vocab_size)
        out_dtype = np.dtype(out_dtype)
        if out_dtype not in (np.float32, np.float16):
            raise ValueError(f"out_dtype must be float32 or float16, not {out_dtype}")
        dev_dtype = torch.float16 if out_dtype == np.float16 else torch.float32
        out = np.empty((len(lengths), self.dim), dtype=out_dtype)
        with self._lock, torch.inference_mode():
            for a, b in self._chunks(offsets):
                run = self._prepare(token_ids[offsets[a] : offsets[b]], lengths[a:b])
                out[a:b] = run().to(dev_dtype).cpu().numpy()
        return out

    def _chunks(self, offsets: np.ndarray) -> list[tuple[int, int]]:
        """Consecutive document ranges of at most max_tokens tokens and max_docs documents."""
        n, a, spans = len(offsets) - 1, 0, []
        while a < n:
            b = int(np.searchsorted(offsets, offsets[a] + self.max_tokens, side="right")) - 1
            b = max(a + 1, min(b, a + self.options.max_docs, n))
            spans.append((a, b))
            a = b
        return spans

    def prepare(self, token_ids: np.ndarray, lengths: np.ndarray) -> Callable[[], torch.Tensor]:
        """Load one chunk (<= max_tokens tokens, <= max_docs documents) onto the device and return a
        function that runs the forward pass on it (a graph replay when graphs are on) and returns
        the float32 ``[N, H]`` device tensor. For benchmarks: times the device work alone."""
        token_ids, lengths, _ = packed_inputs(token_ids, lengths, self.max_seq_len, self.vocab_size)
        if token_ids.size > self.max_tokens or len(lengths) > self.options.max_docs:
            raise ValueError(
                f"prepare() takes one chunk: at most {self.max_tokens} tokens and {self.options.max_docs} documents"
            )
        return self._prepare(token_ids, lengths)

    def _prepare(self, ids: np.ndarray, lens: np.ndarray) -> Callable[[], torch.Tensor]:
        T, N, L = int(ids.size), int(lens.size), int(lens.max())
        if not (self.use_graphs or self._pad_static):
            cu = np.zeros(N + 1, dtype=np.int32)
            np.cumsum(lens, out=cu[1:])
            pos = (np.arange(T, dtype=np.int32) - np.repeat(cu[:-1], lens)).astype(np.int32)
            d = self.device
            ids_t, pos_t, cu_t = (torch.from_numpy(v).to(d) for v in (ids, pos, cu))
            return self._eager(ids_t, pos_t, cu_t, L, N)
        Tb, Lb, lens_all = static_plan(lens, self._t_cap, self.max_seq_len)
        Nb = len(lens_all)
        cu = self._h_cu.numpy()[: Nb + 1]
        cu[0] = 0
        np.cumsum(lens_all, out=cu[1:])
        ids_h, pos_h = self._h_ids.numpy()[:Tb], self._h_pos.numpy()[:Tb]
        ids_h[:T] = ids
        ids_h[T:] = 0  # dummy documents: any valid id
        pos_h[:] = np.arange(Tb, dtype=np.int32) - np.repeat(cu[:-1], lens_all)
        self._d_ids[:Tb].copy_(self._h_ids[:Tb], non_blocking=True)
        self._d_pos[:Tb].copy_(self._h_pos[:Tb], non_blocking=True)
        self._d_cu[: Nb + 1].copy_(self._h_cu[: Nb + 1], non_blocking=True)
        ids_d, pos_d, cu_d = self._d_ids[:Tb], self._d_pos[:Tb], self._d_cu[: Nb + 1]
        if not self.use_graphs:  # the padded shapes without graphs (CPU tests)
            return self._eager(ids_d, pos_d, cu_d, Lb, N)
        graph, out = self._graph(Tb, Nb, Lb)

        def run() -> torch.Tensor:
            graph.replay()
            return out[:N]

        return run

    def _eager(
        self, ids: torch.Tensor, pos: torch.Tensor, cu: torch.Tensor, max_len: int, n: int
    ) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                return self.forward(ids, pos, cu, max_len)[:n]

        return run

    def _alloc_static(self) -> None:
        """Device buffers the graphs read (sized for the largest chunk) and their pinned host twins."""
        self._t_cap = token_bucket(self.max_tokens, self.max_tokens)
        n_cap = _pow2(self.options.max_docs + self._t_cap // 16 + 1) + 1
        d = self.device
        self._d_ids = torch.zeros(self._t_cap, dtype=torch.int32, device=d)
        self._d_pos = torch.zeros(self._t_cap, dtype=torch.int32, device=d)
        self._d_cu = torch.zeros(n_cap, dtype=torch.int32, device=d)
        pin = d.type == "cuda"
        self._h_ids = torch.zeros(self._t_cap, dtype=torch.int32, pin_memory=pin)
        self._h_pos = torch.zeros(self._t_cap, dtype=torch.int32, pin_memory=pin)
        self._h_cu = torch.zeros(n_cap, dtype=torch.int32, pin_memory=pin)
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def use_static_padding(self) -> None:
        """Pad every chunk to its graph shape even without graphs (tests the padding on the CPU)."""
        if not self._pad_static and not self.use_graphs:
            self._pad_static = True
            self._alloc_static()

    def _graph(self, Tb: int, Nb: int, Lb: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The captured graph for a padded shape (captured now if new); reads the static buffers."""
        key = (Tb, Nb, Lb)
        hit = self._graphs.get(key)
        if hit is not None:
            self._graphs.move_to_end(key)
            return hit
        t0 = time.perf_counter()
        ids, pos, cu = self._d_ids[:Tb], self._d_pos[:Tb], self._d_cu[: Nb + 1]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode():
            with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks algorithms
                self.forward(ids, pos, cu, Lb)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.forward(ids, pos, cu, Lb)
        self._graphs[key] = (graph, out)
        self.captures, self.capture_s = self.captures + 1, self.capture_s + time.perf_counter() - t0
        if len(self._graphs) > self.options.max_graphs:
            self._graphs.popitem(last=False)
        logger.debug("captured a CUDA graph for T=%d N=%d L=%d (%d kept)", Tb, Nb, Lb, len(self._graphs))
        return graph, out


def load_gpu_engine(
    folder: str | Path, meta, device: str | torch.device | None = None, **options: Any
) -> GpuBertEngine:
    """The GPU engine for a folder built with ``--target gpu`` (``meta``: its ``ModelMeta``).

    ``options`` override ``GpuOptions`` fields; defaults come from ``meta.options["gpu"]``. At
    precision fp8 the smoothing factors are calibrated here on the bundled real-text sample.
    """
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / meta.engine_file))
    opts = GpuOptions.from_dict({**(meta.options or {}).get("gpu", {}), **options})
    calibration = None
    if meta.precision == "fp8" and opts.fp8_smooth > 0:  # real text for the fp8 smoothing factors
        from core.tokenize import Tokenizer
        from engine.calibration import calibration_texts

        enc = Tokenizer.from_file(Path(folder) / "tokenizer.json", meta.max_seq_len).encode(calibration_texts())
        calibration = (enc.token_ids, enc.lengths)
    return GpuBertEngine(
        BertShape(**meta.shape),
        weights,
        pooling=meta.pooling,
        normalize=meta.normalize,
        max_seq_len=meta.max_seq_len,
        precision=meta.precision,
        device=device,
        options=opts,
        calibration=calibration,
    )
