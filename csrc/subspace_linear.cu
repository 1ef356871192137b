// Fused kernels of the adapted layer (placeholder: plain per-element kernels, replaced by the tiled ones).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "attrspace.h"

namespace attrspace {
namespace {

__device__ float load(const float* p, int64_t i) { return p[i]; }
__device__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

template <typename T>
__device__ float project(const T* a, const T* m, int64_t row, int64_t col, int64_t inner, int64_t k) {
  float acc = 0.f;
  for (int64_t i = 0; i < inner; ++i) acc += load(a, row * inner + i) * load(m, i * k + col);
  return acc;
}

template <typename T>
__global__ void naive_forward(SubspaceForwardParams p) {
  const int64_t t = blockIdx.y;
  const int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* v = static_cast<const T*>(p.v);
  if (o < p.rank) store(static_cast<T*>(p.z), t * p.rank + o, project(x, v, t, o, p.d_in, p.rank));
  if (o >= p.d_out) return;
  float acc = p.bias ? load(static_cast<const T*>(p.bias), o) : 0.f;
  for (int64_t i = 0; i < p.d_in; ++i) acc += load(x, t * p.d_in + i) * load(w, o * p.d_in + i);
  for (int64_t k = 0; k < p.rank; ++k) acc += project(x, v, t, k, p.d_in, p.rank) * p.p[o * p.rank + k];
  store(static_cast<T*>(p.y), t * p.d_out + o, acc);
}

template <typename T>
__global__ void naive_backward(SubspaceBackwardParams p) {
  const int64_t t = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const T* dy = static_cast<const T*>(p.dy);
  const T* w = static_cast<const T*>(p.w);
  const T* u = static_cast<const T*>(p.u);
  if (i < p.rank) p.g[t * p.rank + i] = project(dy, u, t, i, p.d_out, p.rank);
  if (p.dx == nullptr || i >= p.d_in) return;
  float acc = 0.f;
  for (int64_t o = 0; o < p.d_out; ++o) acc += load(dy, t * p.d_out + o) * load(w, o * p.d_in + i);
  for (int64_t k = 0; k < p.rank; ++k) acc += project(dy, u, t, k, p.d_out, p.rank) * p.q[i * p.rank + k];
  store(static_cast<T*>(p.dx), t * p.d_in + i, acc);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace

void subspace_forward_cuda(const SubspaceForwardParams& p, std::uintptr_t stream) {
  if (p.tokens == 0) return;
  const int64_t cols = p.d_out > p.rank ? p.d_out : p.rank;
  dim3 grid(unsigned((cols + 127) / 128), unsigned(p.tokens));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: naive_forward<float><<<grid, 128, 0, s>>>(p); break;
    case DType::kFloat16: naive_forward<__half><<<grid, 128, 0, s>>>(p); break;
    case DType::kBFloat16: naive_forward<__nv_bfloat16><<<grid, 128, 0, s>>>(p); break;
  }
  check(cudaGetLastError(), "subspace_forward_cuda launch");
}

void subspace_backward_cuda(const SubspaceBackwardParams& p, std::uintptr_t stream) {
  if (p.tokens == 0) return;
  const int64_t cols = p.d_in > p.rank ? p.d_in : p.rank;
  dim3 grid(unsigned((cols + 127) / 128), unsigned(p.tokens));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: naive_backward<float><<<grid, 128, 0, s>>>(p); break;
    case DType::kFloat16: naive_backward<__half><<<grid, 128, 0, s>>>(p); break;
    case DType::kBFloat16: naive_backward<__nv_bfloat16><<<grid, 128, 0, s>>>(p); break;
  }
  check(cudaGetLastError(), "subspace_backward_cuda launch");
}

}  // namespace attrspace
