// The bridge between the pybind11 bindings (host compiler) and the CUDA kernels (nvcc).
// Plain data only: no Torch, no CUDA headers. Every pointer is a device address passed as an integer
// from Python; every launch takes the caller's stream.
#pragma once

#include <cstdint>

namespace attrspace {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Forward: y = x W^T + b + z P^T with z = x V, formed in fp32 and rounded once.
struct SubspaceForwardParams {
  const void* x;      // (T, d_in), dtype
  const void* w;      // (d_out, d_in), dtype
  const void* bias;   // (d_out,), dtype, or nullptr
  const void* v;      // (d_in, K), dtype
  const float* p;     // (d_out, K), fp32: s U M
  void* y;            // (T, d_out), dtype
  void* z;            // (T, K), dtype
  float* z_fp32;      // (T, K), fp32 scratch: z before rounding, read by the epilogue of y
  int32_t* schedule;  // scratch of schedule_ints(T) int32, zeroed by the launcher (tile tickets)
  int64_t tokens, d_in, d_out, rank;
  DType dtype;
};

// Backward: dx = dy W + g Q^T with g = dy U, formed in fp32 and rounded once; g is written in fp32.
struct SubspaceBackwardParams {
  const void* dy;     // (T, d_out), dtype
  const void* w;      // (d_out, d_in), dtype
  const void* u;      // (d_out, K), dtype
  const float* q;     // (d_in, K), fp32: s V M^T
  void* dx;           // (T, d_in), dtype, or nullptr when no input gradient is needed
  float* g;           // (T, K), fp32
  int32_t* schedule;  // scratch of schedule_ints(T) int32, zeroed by the launcher (tile tickets)
  int64_t tokens, d_in, d_out, rank;
  DType dtype;
};

constexpr int64_t kMaxRank = 128;

// Scratch int32 elements a launch needs: a tile-ticket counter and one flag per row block (row
// blocks hold at least 64 tokens in every kernel family).
inline int64_t schedule_ints(int64_t tokens) { return 1 + (tokens + 63) / 64; }

// Implemented in subspace_linear.cu, or in no_cuda.cpp (which throws) when built without nvcc.
void subspace_forward_cuda(const SubspaceForwardParams& params, std::uintptr_t stream);
void subspace_backward_cuda(const SubspaceBackwardParams& params, std::uintptr_t stream);

}  // namespace attrspace
