"""Launch-shape sweep of the memory-bound Triton kernels (dll/triton_kernels.py) on BERT-base shapes.

    python benchmarks/bench_kernels.py [--tokens 32768]

For bias+GELU (``[T, 3072]``) and residual+LayerNorm (``[T, 768]``), with and without the fp8
row-quantized output, it times each (rows per program, warps) pair with ``triton.testing.do_bench``
and prints microseconds and the bandwidth reached (bytes read + written / time), to check the
launch shapes ``_rows_and_warps`` picks (results: BENCHMARKS.md, GPU engine, fp8 section).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dll import triton_kernels as tk  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    T, dev, dt = args.tokens, "cuda", torch.bfloat16
    print(torch.cuda.get_device_name())
    for fp8 in (False, True):
        C = 3072
        x, b = torch.randn(T, C, device=dev, dtype=dt), torch.randn(C, device=dev, dtype=dt)
        q = torch.empty(T, C, device=dev, dtype=tk.FP8_DTYPE if fp8 else dt)
        s = torch.empty(T, 1, device=dev, dtype=torch.float32)
        nbytes = T * C * (2 + (1 if fp8 else 2))
        for rows in (1, 2, 4):
            for warps in (2, 4, 8, 16):

                def run():
                    tk._bias_act_kernel[(triton.cdiv(T, rows),)](
                        x, b, q, q, s, b, T, C, ACT=0, ROWS=rows, BLOCK_C=4096, FP8=fp8, SMOOTH=False, num_warps=warps
                    )

                us = triton.testing.do_bench(run) * 1e3
                print(
                    f"bias_act fp8={fp8} rows={rows} warps={warps}: {us:7.1f} us {nbytes / us / 1e6:6.2f} TB/s",
                    flush=True,
                )
        H = 768
        a, r = torch.randn(T, H, device=dev, dtype=dt), torch.randn(T, H, device=dev, dtype=dt)
        g, be = torch.ones(H, device=dev), torch.zeros(H, device=dev)
        y = torch.empty(T, H, device=dev, dtype=dt)
        q2 = torch.empty(T, H, device=dev, dtype=tk.FP8_DTYPE) if fp8 else y
        nbytes = T * H * (2 * 3 + (1 if fp8 else 0))
        for rows in (1, 2, 4, 8):
            for warps in (1, 2, 4, 8):

                def run():
                    tk._residual_ln_kernel[(triton.cdiv(T, rows),)](
                        a,
                        b,
                        r,
                        g,
                        be,
                        y,
                        q2,
                        s,
                        g,
                        T,
                        H,
                        1e-12,
                        HAS_BIAS=True,
                        HAS_RES=True,
                        ROWS=rows,
                        BLOCK_H=1024,
                        FP8=fp8,
                        SMOOTH=False,
                        num_warps=warps,
                    )

                us = triton.testing.do_bench(run) * 1e3
                print(
                    f"residual_ln fp8={fp8} rows={rows} warps={warps}: {us:7.1f} us {nbytes / us / 1e6:6.2f} TB/s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
