// Fused RMS_norm (+ SiLU) for the Wan VAE, with a C ABI so that Python (ctypes, torch data_ptr)
// or a TensorRT plugin can call it without linking against a framework.
//
// The VAE normalises every pixel over its channels: y = x / max(||x||_C, eps) * sqrt(C) * gamma,
// usually followed by SiLU and then a causal conv, whose input is [cache frames | new frames].
// Eager torch spends ~6 passes over the activation on this (upcast, norm, divide, two scales,
// downcast, SiLU); this kernel reads x once and writes y once, in fp32 arithmetic whatever the
// storage type. The channels-first variant can write its output at a frame offset inside a
// larger [B, C, out_T, H, W] buffer, i.e. straight into the conv's concatenated input.
//
// Layouts
//   channels-first  x [B, C, T, HW] contiguous; out [B, C, out_T, HW], rows written at frame t0+t.
//   channels-last   x [N, C] rows (N = B*T*H*W, NDHWC memory); out the same.
// Reference: export/native.py::rms_norm_silu_ref.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float silu(float v) { return v / (1.0f + __expf(-v)); }

// One thread per (b, t, pixel); consecutive threads read consecutive pixels of one channel plane,
// so every load of the channel loop is coalesced.
template <typename T>
__global__ void rms_norm_cf_kernel(const T* __restrict__ x, const T* __restrict__ gamma, T* __restrict__ out,
                                   int64_t B, int64_t C, int64_t Tn, int64_t HW, int64_t out_T, int64_t t0,
                                   float scale, float eps, int apply_silu) {
  const int64_t plane = Tn * HW;
  const int64_t total = B * plane;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / plane;
    const int64_t p = i - b * plane;                 // t * HW + pixel
    const T* src = x + b * C * plane + p;
    float sumsq = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      const float v = to_f(src[c * plane]);
      sumsq = fmaf(v, v, sumsq);
    }
    const float inv = scale / fmaxf(sqrtf(sumsq), eps);
    const int64_t out_plane = out_T * HW;
    T* dst = out + b * C * out_plane + t0 * HW + p;
    for (int64_t c = 0; c < C; ++c) {
      float v = to_f(src[c * plane]) * inv * to_f(gamma[c]);
      if (apply_silu) v = silu(v);
      dst[c * out_plane] = from_f<T>(v);
    }
  }
}

// One warp per row of C contiguous channels.
template <typename T>
__global__ void rms_norm_cl_kernel(const T* __restrict__ x, const T* __restrict__ gamma, T* __restrict__ out,
                                   int64_t N, int64_t C, float scale, float eps, int apply_silu) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; row < N; row += warps) {
    const T* src = x + row * C;
    float sumsq = 0.f;
    for (int64_t c = lane; c < C; c += 32) {
      const float v = to_f(src[c]);
      sumsq = fmaf(v, v, sumsq);
    }
    for (int offset = 16; offset > 0; offset >>= 1) sumsq += __shfl_xor_sync(0xffffffffu, sumsq, offset);
    const float inv = scale / fmaxf(sqrtf(sumsq), eps);
    T* dst = out + row * C;
    for (int64_t c = lane; c < C; c += 32) {
      float v = to_f(src[c]) * inv * to_f(gamma[c]);
      if (apply_silu) v = silu(v);
      dst[c] = from_f<T>(v);
    }
  }
}

int grid_for(int64_t threads, int block) {
  int64_t blocks = (threads + block - 1) / block;
  if (blocks > 65535 * 8) blocks = 65535 * 8;        // grid-stride loops cover the rest
  return (int)(blocks < 1 ? 1 : blocks);
}

template <typename T>
int launch_cf(const void* x, const void* g, void* out, int64_t B, int64_t C, int64_t Tn, int64_t HW, int64_t out_T,
              int64_t t0, float scale, float eps, int apply_silu, cudaStream_t stream) {
  const int block = 256;
  rms_norm_cf_kernel<T><<<grid_for(B * Tn * HW, block), block, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(g), static_cast<T*>(out), B, C, Tn, HW, out_T, t0, scale, eps,
      apply_silu);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_cl(const void* x, const void* g, void* out, int64_t N, int64_t C, float scale, float eps, int apply_silu,
              cudaStream_t stream) {
  const int block = 256;
  rms_norm_cl_kernel<T><<<grid_for(N * 32, block), block, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(g), static_cast<T*>(out), N, C, scale, eps, apply_silu);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

// Bumped when a signature changes; export/native.py checks it.
int wan_vae_ops_abi_version() { return 1; }

// Returns 0 or a cudaError_t value. -1: bad arguments.
int wan_rms_norm_silu_cf(const void* x, const void* gamma, void* out, int dtype, int64_t B, int64_t C, int64_t T,
                         int64_t HW, int64_t out_T, int64_t t0, float scale, float eps, int apply_silu, void* stream) {
  if (!x || !gamma || !out || B < 0 || C < 1 || T < 0 || HW < 0 || t0 < 0 || t0 + T > out_T) return -1;
  if (B * T * HW == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32: return launch_cf<float>(x, gamma, out, B, C, T, HW, out_T, t0, scale, eps, apply_silu, s);
    case kF16: return launch_cf<__half>(x, gamma, out, B, C, T, HW, out_T, t0, scale, eps, apply_silu, s);
    case kBF16: return launch_cf<__nv_bfloat16>(x, gamma, out, B, C, T, HW, out_T, t0, scale, eps, apply_silu, s);
    default: return -1;
  }
}

int wan_rms_norm_silu_cl(const void* x, const void* gamma, void* out, int dtype, int64_t N, int64_t C, float scale,
                         float eps, int apply_silu, void* stream) {
  if (!x || !gamma || !out || N < 0 || C < 1) return -1;
  if (N == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32: return launch_cl<float>(x, gamma, out, N, C, scale, eps, apply_silu, s);
    case kF16: return launch_cl<__half>(x, gamma, out, N, C, scale, eps, apply_silu, s);
    case kBF16: return launch_cl<__nv_bfloat16>(x, gamma, out, N, C, scale, eps, apply_silu, s);
    default: return -1;
  }
}

const char* wan_vae_ops_error_string(int code) {
  return code == -1 ? "invalid arguments" : cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
