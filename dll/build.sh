#!/usr/bin/env bash
# Compile the CUDA C++ fused kernels (dll/src/*.cu) into one shared library per GPU architecture:
#   dll/build/sm_80/libfbas_fused.so   (A100, A10/A30 via binary compatibility within 8.x)
#   dll/build/sm_89/libfbas_fused.so   (L4, L40, RTX 40xx)
#   dll/build/sm_90/libfbas_fused.so   (H100, H200)
# Needs only nvcc (no GPU): CI runs it. Usage: bash dll/build.sh [ARCH ...]   e.g. bash dll/build.sh 90
# NVCC (default: nvcc on PATH) and NVCC_FLAGS (extra flags) may be set in the environment.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
nvcc_bin="${NVCC:-nvcc}"
if ! command -v "$nvcc_bin" >/dev/null 2>&1; then
  echo "dll/build.sh: nvcc not found (set NVCC=/path/to/nvcc or install the CUDA toolkit)" >&2
  exit 2
fi
archs=("$@")
[ ${#archs[@]} -eq 0 ] && archs=(80 89 90)
for arch in "${archs[@]}"; do
  out="$here/build/sm_${arch}"
  mkdir -p "$out"
  tmp="$out/libfbas_fused.so.tmp"
  "$nvcc_bin" -O3 -std=c++17 -shared -Xcompiler -fPIC -lineinfo \
    -gencode "arch=compute_${arch},code=sm_${arch}" ${NVCC_FLAGS:-} \
    -o "$tmp" "$here/src/fbas_fused.cu"
  mv -f "$tmp" "$out/libfbas_fused.so"
  echo "built $out/libfbas_fused.so"
done
