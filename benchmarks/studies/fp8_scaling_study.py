"""Which fp8 (e4m3) scaling keeps the embeddings within min cosine 0.999? A CPU emulation study.

    PYTHONPATH=. .venv/bin/python benchmarks/studies/fp8_scaling_study.py [--data tests/data]

The GPU engine's PyTorch twins quantize the fp8 GEMM operands exactly as the GPU path does
(``engine.gpu_kernels.quantize_rows_fp8`` for activations, ``engine.torch_gpu._quantize_weight``
for weights). This script swaps those two quantizers for other scalings (fp32 = not quantized,
per row / per channel, 1xB blocks, 128x128 weight blocks), runs the bundled all-MiniLM-L6-v2 on
real text (STS-B test sentences and long documents) on the CPU, and prints each variant's
cosine to the same code in fp32 (the fp8 path computes GELU in its tanh form, the fp32 one in
its erf form: at most 5e-4 apart, far below fp8 rounding). Results: benchmarks/NOTES.md, GPU engine,
section 3.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/studies/ -> the repository root
sys.path.insert(0, str(ROOT))

import engine.gpu_kernels as gk  # noqa: E402
import engine.torch_gpu as tg  # noqa: E402
from core.tokenize import Tokenizer, tokenizer_json_for
from engine.checkpoint import load_checkpoint  # noqa: E402
from engine.torch_gpu import GpuBertEngine, GpuOptions  # noqa: E402

FP8_MAX = gk.FP8_MAX


def r8(x: torch.Tensor) -> torch.Tensor:
    """Round to float8_e4m3fn and back."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def act_quantizer(block):
    """Activations ``[M, K]`` -> (dequantized fp8 values, unit scales): None = fp32, "row", or a block size."""

    def quantize(y, smooth=None):
        y = y.float() if smooth is None else y.float() * smooth.float()[None]
        M, K = y.shape
        if block is None:
            return y, torch.ones(M, 1)
        yb = y.reshape(M, 1, K) if block == "row" else y.reshape(M, K // block, block)
        s = yb.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
        return (r8(yb / s) * s).reshape(M, K), torch.ones(M, 1)

    return quantize


def weight_quantizer(mode):
    """Weights ``[out, in]`` -> (dequantized fp8 values, unit scales): None = fp32, "channel", "128x128"."""

    def quantize(w):
        w32 = w.float()
        O, K = w32.shape
        if mode is None:
            return w32.contiguous(), torch.ones(1, O)
        wt = w32.reshape(O, 1, 1, K) if mode == "channel" else w32.reshape(O // 128, 128, K // 128, 128)
        dims = (3,) if mode == "channel" else (1, 3)
        s = wt.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / FP8_MAX
        return (r8(wt / s) * s).reshape(O, K).contiguous(), torch.ones(1, O)

    return quantize


VARIANTS = [  # (label, activations, weights, GEMMs in fp8)
    ("rows x channels, QKV+FFN1+FFN2 (shipped)", "row", "channel", "qkv,ffn1,ffn2"),
    ("activations only (rows), all three", "row", None, "qkv,ffn1,ffn2"),
    ("weights only (channels), all three", None, "channel", "qkv,ffn1,ffn2"),
    ("1x128 blocks x channels, all three", 128, "channel", "qkv,ffn1,ffn2"),
    ("1x32 blocks x channels, all three", 32, "channel", "qkv,ffn1,ffn2"),
    ("1x128 blocks x 128x128 blocks, all three", 128, "128x128", "qkv,ffn1,ffn2"),
    ("rows x channels, FFN1 only", "row", "channel", "ffn1"),
    ("rows x channels, FFN2 only", "row", "channel", "ffn2"),
    ("rows x channels, QKV only", "row", "channel", "qkv"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "tests" / "data", help="holds stsb_multi_mt/")
    args = ap.parse_args()
    ck = load_checkpoint(None)

    def rows(name):
        with open(args.data / "stsb_multi_mt" / name, encoding="utf-8", newline="") as f:
            return [t for r in csv.reader(f) for t in r[:2]]

    texts, pool = rows("stsb-en-test.csv")[:1200], rows("stsb-en-dev.csv")
    texts += [" ".join(pool[i * 30 : (i + 1) * 30]) for i in range(16)]
    enc = Tokenizer(tokenizer_json_for(ck.tokenizer), 256).encode(texts)

    def run(precision, gemms="qkv,ffn1,ffn2"):
        eng = GpuBertEngine(
            ck.shape,
            ck.weights,
            pooling="mean",
            normalize=True,
            max_seq_len=256,
            precision=precision,
            device="cpu",
            options=GpuOptions(fp8_gemms=gemms, fp8_smooth=0),
        )
        return eng.embed(enc.token_ids, enc.lengths)

    ref = run("fp32")
    print(f"{len(texts)} texts, {int(enc.lengths.sum())} tokens; cosine to fp32")
    for label, a, w, gemms in VARIANTS:
        gk.quantize_rows_fp8, tg._quantize_weight = act_quantizer(a), weight_quantizer(w)
        v = run("fp8", gemms)
        c = (v * ref).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(ref, axis=1)
        print(f"{label:45s} min {c.min():.5f} mean {c.mean():.5f}", flush=True)


if __name__ == "__main__":
    main()
