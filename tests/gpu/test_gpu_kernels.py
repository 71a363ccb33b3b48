"""Every fused kernel (Triton-language and CUDA C++) against its PyTorch twin, random shapes and dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from dll.twins import TorchKernels
from engine.gpu_kernels import TritonKernels, flash_varlen

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on an H100/H200)")
DEV = torch.device("cuda")
TWIN = TorchKernels()
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [(1, 64), (37, 384), (1029, 768), (64, 4096)]  # (T, H)


def ulp_close(got: torch.Tensor, want: torch.Tensor, ulps: float = 2.0) -> None:
    """Within a few units of the output dtype's last place, relative to each row's scale."""
    assert got.dtype == want.dtype and got.shape == want.shape
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-18}[want.dtype]
    scale = want.float().abs().amax(-1, keepdim=True).clamp_min(1.0)
    err = ((got.float() - want.float()).abs() / scale).max().item()
    assert torch.isfinite(got.float()).all()
    assert err <= ulps * eps, f"max error {err:.3g} > {ulps} ulp ({eps:.3g})"


def fp8_close(got: tuple, want: tuple) -> None:
    """Row-quantized fp8 (q, scale): same scales; dequantized values within one e4m3 step."""
    (gq, gs), (wq, ws) = got, want
    assert gq.dtype == torch.float8_e4m3fn and gs.dtype == torch.float32 and gs.shape == ws.shape
    torch.testing.assert_close(gs, ws, rtol=1e-3, atol=1e-6)  # ws from a rounded dtype may differ by rounding
    deq_g, deq_w = gq.float() * gs, wq.float() * ws
    err = (deq_g - deq_w).abs() / (deq_w.abs().amax(-1, keepdim=True).clamp_min(1e-6))
    assert err.max().item() <= 2**-3
    assert (gq.float() != wq.float()).float().mean().item() < 0.02


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,H", SHAPES)
def test_embed_layernorm(kernels, dtype, T, H):
    V, P = 1000, 512
    ids = torch.randint(0, V, (T,), device=DEV, dtype=torch.int32)
    pos = torch.randint(0, P, (T,), device=DEV, dtype=torch.int32)
    k = kernels
    args = (ids, pos, rnd(V, H, dtype=dtype), rnd(P, H, dtype=dtype), rnd(H, dtype=dtype), rnd(H), rnd(H), 1e-12)
    ulp_close(k.embed_layernorm(*args), TWIN.embed_layernorm(*args))
    if dtype != torch.float32:
        for smooth in (None, torch.rand(H, device=DEV) + 0.5):
            got, want = k.embed_layernorm_fp8(*args, smooth=smooth), TWIN.embed_layernorm_fp8(*args, smooth=smooth)
            ulp_close(got[0], want[0])
            fp8_close(got[1:], want[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,H", SHAPES)
@pytest.mark.parametrize("with_bias,with_res", [(True, True), (False, True), (True, False)])
def test_bias_residual_layernorm(kernels, dtype, T, H, with_bias, with_res):
    k = kernels
    args = (
        rnd(T, H, dtype=dtype, scale=3),
        rnd(H, dtype=dtype) if with_bias else None,
        rnd(T, H, dtype=dtype) if with_res else None,
        rnd(H),
        rnd(H),
        1e-5,
    )
    ulp_close(k.bias_residual_layernorm(*args), TWIN.bias_residual_layernorm(*args))
    if dtype != torch.float32:
        for smooth in (None, torch.rand(H, device=DEV) + 0.5):
            got = k.bias_residual_layernorm_fp8(*args, smooth=smooth)
            want = TWIN.bias_residual_layernorm_fp8(*args, smooth=smooth)
            ulp_close(got[0], want[0])
            fp8_close(got[1:], want[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,C", [(1, 64), (33, 1536), (513, 3072), (17, 4096)])
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_bias_act(kernels, dtype, T, C, act):
    k = kernels
    x, b = rnd(T, C, dtype=dtype, scale=3), rnd(C, dtype=dtype)
    ulp_close(k.bias_act(x, b, act), TWIN.bias_act(x, b, act), ulps=3)
    if dtype != torch.float32:
        fp8_close(k.bias_act_fp8(x, b, act), TWIN.bias_act_fp8(x, b, act))
        smooth = torch.rand(C, device=DEV) + 0.5
        fp8_close(k.bias_act_fp8(x, b, act, smooth=smooth), TWIN.bias_act_fp8(x, b, act, smooth=smooth))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["mean", "max", "cls"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("H", [384, 768, 1000])
def test_pool(kernels, dtype, mode, normalize, H):
    k = kernels
    lens = torch.tensor([1, 7, 0, 128, 33, 512, 2, 0], dtype=torch.int32)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    cu = cu.to(DEV)
    x = rnd(int(lens.sum()) + 5, H, dtype=dtype)  # rows past cu[-1] are ignored
    got, want = k.pool(x, cu, mode, normalize, 512), TWIN.pool(x, cu, mode, normalize, 512)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hd", [32, 64, 128])
def test_flash_varlen_attention_matches_twin(dtype, hd):
    lens = [1, 17, 128, 0, 300, 64, 5]
    T, nh = sum(lens), 4
    q, k, v = (rnd(T, nh, hd, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    got = flash_varlen(q, k, v, cu, max(lens), 1 / math.sqrt(hd))
    want = TWIN.varlen_attention(q.float(), k.float(), v.float(), cu, max(lens), 1 / math.sqrt(hd))
    torch.testing.assert_close(got.float(), want, atol=3e-2 if dtype == torch.bfloat16 else 5e-3, rtol=0)


def test_flash_varlen_takes_strided_qkv_views():
    T, nh, hd = 200, 12, 64
    qkv = rnd(T, 3, nh, hd, dtype=torch.float16)
    cu = torch.tensor([0, 50, 200], dtype=torch.int32, device=DEV)
    got = flash_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, 150, 0.125)
    want = flash_varlen(*(qkv[:, i].contiguous() for i in range(3)), cu, 150, 0.125)
    assert torch.equal(got, want)


@pytest.mark.parametrize("M,N,K", [(64, 2304, 768), (1000, 3072, 768), (48, 768, 3072)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_scaled_mm_matches_dequantized_twin(M, N, K, with_bias):
    from engine.gpu_kernels import quantize_rows_fp8

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    aq, as_ = quantize_rows_fp8(rnd(M, K))
    wq, ws = quantize_rows_fp8(rnd(N, K, scale=0.05))
    bias = rnd(N, dtype=torch.bfloat16) if with_bias else None
    got = TritonKernels().scaled_mm(aq, as_, wq, ws.reshape(1, -1), bias, torch.bfloat16)
    want = TWIN.scaled_mm(aq, as_, wq, ws.reshape(1, -1), bias, torch.bfloat16)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2
