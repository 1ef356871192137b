// Shared device code of the fused adapter kernels: argument block, tile sizes, scheduling.
// Like every csrc/subspace_linear_*.cuh header it includes CUDA headers only (no host-only headers,
// no <cstdint>): the NVRTC JIT of attrspace/backends/cupy_jit.py compiles the same text as nvcc.
//
// One kernel shape serves both passes. A (M, Kd) holds the activations (x forward, dy backward).
//   projection tiles: proj32 = A B_proj in fp32, B_proj (Kd, R) = V or U; also rounded into `proj`
//                     (z) when that is non-null
//   output tiles:     out = round(A B_main + bias + proj32 E^T), E (N, R) fp32 = P or Q
// forward:  M = T, Kd = d_in, N = d_out, B_main(k, n) = W[n][k] (layout kNK), proj = z, any bias
// backward: M = T, Kd = d_out, N = d_in, B_main(k, n) = W[k][n] (layout kKN), proj32 = g, no bias;
//           out = dx may be null, and then only projection tiles run
// Scheduling: each CTA takes a ticket from schedule[0]; tickets run row block by row block, the
// projection tiles of a row block before its output tiles. An output tile waits, after its main
// loop, until schedule[1 + row block] counts all projection tiles of its rows. A CTA only waits on
// smaller tickets, held by CTAs that are already running and never wait, so every wait ends
// whatever order the hardware starts blocks in. schedule must be zero at launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "subspace_linear_ptx.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the attrspace kernels use sm_80 instructions (cp.async, bf16 mma); build for sm_80 or newer"
#endif

namespace attrspace_kernels {

typedef long long i64;

// The operands of one launch (the entry points take the same 13 fields as scalar parameters).
struct FusedGemmArgs {
  const void* a;       // (M, Kd) elem
  const void* b_main;  // elem, see the layouts above
  const void* b_proj;  // (Kd, R) elem
  const void* bias;    // (N,) elem, or null
  const float* e;      // (N, R) fp32
  void* out;           // (M, N) elem, or null
  float* proj32;       // (M, R) fp32
  void* proj;          // (M, R) elem, or null
  int* schedule;       // ticket counter, then one ready counter per row block
  i64 m, n, kd, rank;
};

constexpr int kThreads = 256;
constexpr int kNK = 0;  // B(k, n) at b[n * ldb + k]
constexpr int kKN = 1;  // B(k, n) at b[k * ldb + n]

// Tensor-core family (fp16, bf16): 128 x 128 CTA tiles, 8 warps of 64 x 32, k-steps of 32.
constexpr int kTcBlockM = 128;
constexpr int kTcBlockN = 128;
constexpr int kTcBlockK = 32;
// SIMT family (fp32): 64 x 64 CTA tiles, 4 x 4 outputs per thread, k-steps of 16.
constexpr int kSimtBlockM = 64;
constexpr int kSimtBlockN = 64;
constexpr int kSimtBlockK = 16;

__device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

// Number of sub-tiles of `size` that hold at least one of `remaining` valid rows, at most `cap`.
__device__ __forceinline__ int live_tiles(int remaining, int size, int cap) {
  const int n = remaining <= 0 ? 0 : cdiv(remaining, size);
  return n < cap ? n : cap;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_pair(__half* p, float v0, float v1) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v0, v1);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
}

// ---- Scheduling -------------------------------------------------------------------------------

struct Tile {
  int row_block;
  int col_block;  // among projection tiles when `projection`, else among output tiles
  bool projection;
};

__device__ __forceinline__ Tile take_tile(int* counter, int n_proj, int n_out) {
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(counter, 1);
  __syncthreads();
  const int per_row = n_proj + n_out;
  const int j = ticket % per_row;
  Tile tile;
  tile.row_block = ticket / per_row;
  tile.projection = j < n_proj;
  tile.col_block = tile.projection ? j : j - n_proj;
  return tile;
}

// Called by every thread after its last global store of the tile: the fences before and after the
// barrier (the latter cumulative over the stores thread 0 observed through it) order every store of
// the block before the counter increment that wait_until() acquires.
__device__ __forceinline__ void publish(int* ready) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(ready, 1);
  }
}

__device__ __forceinline__ void wait_until(const int* ready, int count) {
  if (threadIdx.x == 0) {
    for (;;) {
      if (ld_acquire_gpu(ready) >= count) break;
      __nanosleep(64);
    }
  }
  __syncthreads();
}

}  // namespace attrspace_kernels
