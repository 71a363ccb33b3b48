// Fused elementwise kernels of the fbas GPU engine, CUDA C++ (fp16 / bf16 tensors, float32 math).
//
// The twin of each exported function is in engine/gpu_kernels.py (TorchKernels), same meaning:
//   fbas_embed_layernorm     y[T,H] = LN(word[ids] + posw[pos] + type0)
//   fbas_residual_layernorm  y[T,H] = LN(x + bias + residual)            (bias, residual may be NULL)
//   fbas_bias_act            y[T,C] = act(x + bias), act 0 erf-GELU, 1 tanh-GELU, 2 ReLU
// LayerNorm: one warp per row, 16-byte loads (8 elements), the row kept in registers, two-pass
// mean / variance. gamma and beta are float32. H and C must be multiples of 8, H <= 4096.
// Each function returns a cudaError_t (0 = launched); kernels run on the given stream.
// Build: dll/build.sh (one shared library per GPU architecture).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kVec = 8;          // elements per 16-byte access
constexpr int kWarpsPerBlock = 4;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
union Vec {
  uint4 raw;
  T h[kVec];
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[kVec]) {
  Vec<T> v;
  v.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_f<T>(v.h[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[kVec]) {
  Vec<T> v;
#pragma unroll
  for (int i = 0; i < kVec; ++i) v.h[i] = from_f<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = v.raw;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// LayerNorm of one row held as VPL vectors per lane; writes y. x[j][i] is element (lane + 32*j)*8 + i.
template <typename T, int VPL>
__device__ __forceinline__ void ln_row_store(float (&x)[VPL][kVec], int lane, int H, float eps,
                                             const float* __restrict__ gamma, const float* __restrict__ beta,
                                             T* __restrict__ yrow) {
  const int nvec = H / kVec;
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    if (lane + 32 * j < nvec) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) s += x[j][i];
    }
  }
  const float mean = warp_sum(s) / H;
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    if (lane + 32 * j < nvec) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        x[j][i] -= mean;
        ss += x[j][i] * x[j][i];
      }
    }
  }
  const float rstd = rsqrtf(warp_sum(ss) / H + eps);
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int v = lane + 32 * j;
    if (v < nvec) {
      float out[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[i] = x[j][i] * rstd * gamma[v * kVec + i] + beta[v * kVec + i];
      store_vec<T>(yrow + v * kVec, out);
    }
  }
}

template <typename T, int VPL>
__global__ void residual_ln_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ bias,
                                   const T* __restrict__ res, const float* __restrict__ gamma,
                                   const float* __restrict__ beta, int64_t rows, int H, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int nvec = H / kVec;
  float v[VPL][kVec];
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int c = lane + 32 * j;
    if (c < nvec) {
      float a[kVec];
      load_vec<T>(x + row * H + c * kVec, a);
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[j][i] = a[i];
      if (res != nullptr) {
        float r[kVec];
        load_vec<T>(res + row * H + c * kVec, r);
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[j][i] += r[i];
      }
      if (bias != nullptr) {
        float b[kVec];
        load_vec<T>(bias + c * kVec, b);
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[j][i] += b[i];
      }
    }
  }
  ln_row_store<T, VPL>(v, lane, H, eps, gamma, beta, y + row * H);
}

template <typename T, int VPL>
__global__ void embed_ln_kernel(T* __restrict__ y, const int32_t* __restrict__ ids, const int32_t* __restrict__ pos,
                                const T* __restrict__ word, const T* __restrict__ posw, const T* __restrict__ type0,
                                const float* __restrict__ gamma, const float* __restrict__ beta, int64_t rows, int H,
                                float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int nvec = H / kVec;
  const int64_t tok = ids[row], p = pos[row];
  float v[VPL][kVec];
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int c = lane + 32 * j;
    if (c < nvec) {
      float a[kVec], b[kVec], t[kVec];
      load_vec<T>(word + tok * H + c * kVec, a);
      load_vec<T>(posw + p * H + c * kVec, b);
      load_vec<T>(type0 + c * kVec, t);
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[j][i] = a[i] + b[i] + t[i];
    }
  }
  ln_row_store<T, VPL>(v, lane, H, eps, gamma, beta, y + row * H);
}

template <int ACT>
__device__ __forceinline__ float act_f(float x) {
  if (ACT == 0) return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
  if (ACT == 1) return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
  return fmaxf(x, 0.f);
}

template <typename T, int ACT>
__global__ void bias_act_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ bias,
                                int64_t nvec_total, int C) {
  const int cvec = C / kVec;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nvec_total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int c = (int)(i % cvec);
    float a[kVec], b[kVec], out[kVec];
    load_vec<T>(x + i * kVec, a);
    load_vec<T>(bias + c * kVec, b);
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = act_f<ACT>(a[k] + b[k]);
    store_vec<T>(y + i * kVec, out);
  }
}

template <typename T, int VPL>
cudaError_t launch_res(void* y, const void* x, const void* bias, const void* res, const float* g, const float* b,
                       int64_t rows, int H, float eps, cudaStream_t s) {
  const dim3 grid((unsigned)((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  residual_ln_kernel<T, VPL><<<grid, 32 * kWarpsPerBlock, 0, s>>>(
      (T*)y, (const T*)x, (const T*)bias, (const T*)res, g, b, rows, H, eps);
  return cudaGetLastError();
}

template <typename T, int VPL>
cudaError_t launch_emb(void* y, const int32_t* ids, const int32_t* pos, const void* word, const void* posw,
                       const void* type0, const float* g, const float* b, int64_t rows, int H, float eps,
                       cudaStream_t s) {
  const dim3 grid((unsigned)((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  embed_ln_kernel<T, VPL><<<grid, 32 * kWarpsPerBlock, 0, s>>>(
      (T*)y, ids, pos, (const T*)word, (const T*)posw, (const T*)type0, g, b, rows, H, eps);
  return cudaGetLastError();
}

// Smallest instantiated vectors-per-lane that holds H: 1, 2, 3, 4, 8, 16 (H <= 4096).
#define FBAS_DISPATCH_VPL(H, FN, T, ...)                                   \
  do {                                                                      \
    const int need = ((H) / kVec + 31) / 32;                                \
    if (need <= 1) return FN<T, 1>(__VA_ARGS__);                            \
    if (need <= 2) return FN<T, 2>(__VA_ARGS__);                            \
    if (need <= 3) return FN<T, 3>(__VA_ARGS__);                            \
    if (need <= 4) return FN<T, 4>(__VA_ARGS__);                            \
    if (need <= 8) return FN<T, 8>(__VA_ARGS__);                            \
    if (need <= 16) return FN<T, 16>(__VA_ARGS__);                          \
    return cudaErrorInvalidValue;                                           \
  } while (0)

template <typename T>
cudaError_t launch_act(void* y, const void* x, const void* bias, int64_t rows, int C, int act, cudaStream_t s) {
  const int64_t nvec = rows * (C / kVec);
  if (nvec == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t want = (nvec + threads - 1) / threads;
  const unsigned blocks = (unsigned)(want < 65535 * 8 ? want : 65535 * 8);
  switch (act) {
    case 0: bias_act_kernel<T, 0><<<blocks, threads, 0, s>>>((T*)y, (const T*)x, (const T*)bias, nvec, C); break;
    case 1: bias_act_kernel<T, 1><<<blocks, threads, 0, s>>>((T*)y, (const T*)x, (const T*)bias, nvec, C); break;
    case 2: bias_act_kernel<T, 2><<<blocks, threads, 0, s>>>((T*)y, (const T*)x, (const T*)bias, nvec, C); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" {

// dtype: 0 = fp16, 1 = bf16. Pointers are device pointers; stream is a cudaStream_t (0 = default).
int fbas_residual_layernorm(void* y, const void* x, const void* bias, const void* res, const float* gamma,
                            const float* beta, int64_t rows, int H, float eps, int dtype, void* stream) {
  if (H % kVec != 0 || H > 4096) return (int)cudaErrorInvalidValue;
  if (rows == 0) return 0;
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == 0) FBAS_DISPATCH_VPL(H, launch_res, __half, y, x, bias, res, gamma, beta, rows, H, eps, s);
  if (dtype == 1) FBAS_DISPATCH_VPL(H, launch_res, __nv_bfloat16, y, x, bias, res, gamma, beta, rows, H, eps, s);
  return (int)cudaErrorInvalidValue;
}

int fbas_embed_layernorm(void* y, const int32_t* ids, const int32_t* pos, const void* word, const void* posw,
                         const void* type0, const float* gamma, const float* beta, int64_t rows, int H, float eps,
                         int dtype, void* stream) {
  if (H % kVec != 0 || H > 4096) return (int)cudaErrorInvalidValue;
  if (rows == 0) return 0;
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == 0) FBAS_DISPATCH_VPL(H, launch_emb, __half, y, ids, pos, word, posw, type0, gamma, beta, rows, H, eps, s);
  if (dtype == 1)
    FBAS_DISPATCH_VPL(H, launch_emb, __nv_bfloat16, y, ids, pos, word, posw, type0, gamma, beta, rows, H, eps, s);
  return (int)cudaErrorInvalidValue;
}

int fbas_bias_act(void* y, const void* x, const void* bias, int64_t rows, int C, int act, int dtype, void* stream) {
  if (C % kVec != 0) return (int)cudaErrorInvalidValue;
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == 0) return (int)launch_act<__half>(y, x, bias, rows, C, act, s);
  if (dtype == 1) return (int)launch_act<__nv_bfloat16>(y, x, bias, rows, C, act, s);
  return (int)cudaErrorInvalidValue;
}

// Version of the C interface, checked by dll/cuda_lib.py.
int fbas_abi_version(void) { return 1; }

}  // extern "C"
