// The bridge between the pybind11 bindings (host compiler) and the CUDA kernels (nvcc).
// Plain data only: no Torch, no CUDA headers. Every pointer is a device address passed as an integer
// from Python; every launch takes the caller's stream.
#pragma once

#include <cstdint>

namespace attrspace {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Forward: y = x W^T + b + z P^T with z = x V, formed in fp32 and rounded once. One launch; with u
// non-null the same launch first forms P = scale U M into the p scratch (whole-layer forward).
struct SubspaceForwardParams {
  const void* x;      // (T, d_in), dtype
  const void* w;      // (d_out, d_in), dtype
  const void* bias;   // (d_out,), dtype, or nullptr
  const void* v;      // (d_in, K), dtype
  float* p;           // (d_out, K), fp32: s U M, an input, or scratch written here when u is given
  void* y;            // (T, d_out), dtype
  void* z;            // (T, K), dtype
  float* z_fp32;      // (T, K), fp32 scratch: z before rounding, read by the epilogue of y
  int32_t* schedule;  // schedule_ints(T, d_out) int32, all zero; the launch leaves it zero
  int64_t tokens, d_in, d_out, rank;
  DType dtype;
  const void* u = nullptr;   // (d_out, K), dtype, or nullptr: P is then the caller's
  const float* m = nullptr;  // (K, K), fp32: M (with u)
  float scale = 1.f;         // s (with u)
};

// Backward: dx = dy W + g Q^T with g = dy U, formed in fp32 and rounded once; g is written in fp32.
// One launch; with v non-null it first forms Q = scale V M^T into the q scratch, and with dm
// non-null it also reduces dM = scale g^T z (deterministic order) inside the same launch.
struct SubspaceBackwardParams {
  const void* dy;     // (T, d_out), dtype
  const void* w;      // (d_out, d_in), dtype
  const void* u;      // (d_out, K), dtype
  float* q;           // (d_in, K), fp32: s V M^T, an input, or scratch written here when v is given
  void* dx;           // (T, d_in), dtype, or nullptr when no input gradient is needed
  float* g;           // (T, K), fp32
  int32_t* schedule;  // schedule_ints(T, d_in) int32, all zero; the launch leaves it zero
  int64_t tokens, d_in, d_out, rank;
  DType dtype;
  const void* v = nullptr;   // (d_in, K), dtype, or nullptr: Q is then the caller's
  const float* m = nullptr;  // (K, K), fp32: M (with v)
  const void* z = nullptr;   // (T, K), dtype: the forward's z (with dm)
  float* dm = nullptr;       // (K, K), fp32, or nullptr: no dM
  float* part = nullptr;     // grad_part_floats(T, K) fp32 scratch (with dm)
  float scale = 1.f;         // s (with v or dm)
};

constexpr int64_t kMaxRank = 128;

// Schedule int32 elements a launch needs: the ticket, finished and dM counters, one ready counter
// per row block and one flag per output column tile (row blocks and column tiles hold at least 64
// rows / columns in every kernel family). n: the output columns (d_out forward, d_in backward).
inline int64_t schedule_ints(int64_t tokens, int64_t n) {
  return 3 + (tokens + 63) / 64 + (n + 63) / 64;
}

// fp32 scratch elements of the dM reduction: a K x K part per row block of >= 64 rows.
inline int64_t grad_part_floats(int64_t tokens, int64_t rank) {
  return (tokens + 63) / 64 * rank * rank;
}

// Implemented in subspace_linear.cu, or in no_cuda.cpp (which throws) when built without nvcc.
void subspace_forward_cuda(const SubspaceForwardParams& params, std::uintptr_t stream);
void subspace_backward_cuda(const SubspaceBackwardParams& params, std::uintptr_t stream);

}  // namespace attrspace
