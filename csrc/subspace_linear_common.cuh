// Shared device code of the fused adapter kernels: argument block, tile sizes, scheduling.
// Like every csrc/subspace_linear_*.cuh header it includes CUDA headers only (no host-only headers,
// no <cstdint>): the NVRTC JIT of attrspace/backends/cupy_jit.py compiles the same text as nvcc.
//
// One kernel shape serves both passes. A (M, Kd) holds the activations (x forward, dy backward).
//   factor tiles:     E = scale F M' (fp32, exact products) when `factor` is non-null, column tile
//                     by column tile; M' = M forward (P = s U M), M^T backward (Q = s V M^T)
//   projection tiles: proj32 = A B_proj in fp32, B_proj (Kd, R) = V or U; also rounded into `proj`
//                     (z) when that is non-null; with `dm` non-null each also writes its part of
//                     proj32^T side (g^T z) to a slot, and the last one sums the slots into dM
//   output tiles:     out = round(A B_main + bias + proj32 E^T), E (N, R) fp32 = P or Q
// forward:  M = T, Kd = d_in, N = d_out, B_main(k, n) = W[n][k] (layout kNK), proj = z, any bias
// backward: M = T, Kd = d_out, N = d_in, B_main(k, n) = W[k][n] (layout kKN), proj32 = g, no bias;
//           out = dx may be null, and then only projection tiles run (no factor tiles either)
// So one launch is a whole pass: P (Q), the layer's output, and in the backward dM = s g^T z.
//
// Scheduling: each CTA takes a ticket from schedule[kTicket]. The first n_factor tickets are the
// factor tiles (one per output column tile); the rest run row block by row block, the projection
// tiles of a row block before its output tiles. An output tile waits, after its main loop, until its
// row block's flag counts all projection tiles of its rows and its column tile's factor flag is set.
// The dM part of a projection tile waits on nothing: it increments schedule[kGradDone] (acq_rel:
// fences around a relaxed atomic), and the tile that makes it n_row * n_proj sums the slots, which
// were all released before their increments.
// Deadlock freedom: a CTA only waits on flags set by CTAs holding smaller tickets (an output tile on
// its row block's projection tiles and on the factor tiles, which come first). A smaller ticket was
// taken earlier, so its CTA is already running (it has an SM) and finishes without waiting on any
// larger ticket; by induction on the ticket every wait ends, whatever order the hardware starts
// blocks in and however few fit on the GPU at once.
// No memset per launch: the schedule is zeroed once when allocated, and the CTA that finishes last
// (the gridDim.x-th increment of schedule[kFinished]) writes it back to zero. Every other CTA has
// taken its ticket and passed its waits before its own increment, so nothing reads the schedule
// after the reset; the next launch on the stream starts after this one ends. Launches that share a
// schedule must therefore be ordered (one stream); the host keeps one schedule per stream.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "subspace_linear_ptx.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the attrspace kernels use sm_80 instructions (cp.async, bf16 mma); build for sm_80 or newer"
#endif

namespace attrspace_kernels {

typedef long long i64;

// The operands of one launch (the entry points take the same fields as scalar parameters).
struct FusedGemmArgs {
  const void* a;       // (M, Kd) elem
  const void* b_main;  // elem, see the layouts above
  const void* b_proj;  // (Kd, R) elem
  const void* bias;    // (N,) elem, or null
  float* e;            // (N, R) fp32: read by output tiles; written by factor tiles when `factor`
  void* out;           // (M, N) elem, or null
  float* proj32;       // (M, R) fp32
  void* proj;          // (M, R) elem, or null
  int* schedule;       // schedule_ints() ints, zero at launch and left zero (layout: kTicket...)
  const void* factor;  // (N, R) elem, or null: then E is an input
  const float* core;   // (R, R) fp32, M: read as M forward and as M^T backward (with `factor`)
  const void* side;    // (M, R) elem: z, for dM (with `dm`)
  float* dm;           // (R, R) fp32 = scale proj32^T side, or null
  float* part;         // (cdiv(M, block M), R, R) fp32 scratch: dM part of each row block (`dm`)
  i64 m, n, kd, rank;
  float scale;         // of E and dM
};

// The schedule: the ticket counter, CTAs finished, projection tiles whose dM part is written, then
// one ready counter per row block and one flag per factor (output column) tile.
constexpr int kTicket = 0;
constexpr int kFinished = 1;
constexpr int kGradDone = 2;
constexpr int kFlags = 3;

constexpr int kThreads = 256;
constexpr int kMaxRank = 128;  // K; attrspace.h and the Python launchers check it
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

// Tiles of one launch for CTA tiles of bm x bn.
struct Plan {
  int n_row, n_proj, n_out, n_factor;
};

__device__ __forceinline__ Plan make_plan(const FusedGemmArgs& args, int bm, int bn) {
  Plan plan;
  plan.n_row = cdiv(static_cast<int>(args.m), bm);
  plan.n_proj = cdiv(static_cast<int>(args.rank), bn);
  plan.n_out = args.out != nullptr ? cdiv(static_cast<int>(args.n), bn) : 0;
  plan.n_factor = args.factor != nullptr ? plan.n_out : 0;  // E is read only by output tiles
  return plan;
}

enum TileKind { kFactorTile, kProjectionTile, kOutputTile, kNoTile };

struct Tile {
  int row_block;
  int col_block;  // among factor, projection or output tiles, by kind
  TileKind kind;
};

__device__ __forceinline__ Tile take_tile(int* schedule, const Plan& plan) {
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(schedule + kTicket, 1);
  __syncthreads();
  Tile tile;
  tile.row_block = 0;
  tile.col_block = ticket;
  tile.kind = kFactorTile;
  if (ticket < plan.n_factor) return tile;
  const int per_row = plan.n_proj + plan.n_out;
  const int t = ticket - plan.n_factor, j = t % per_row;
  tile.row_block = t / per_row;
  tile.kind = tile.row_block >= plan.n_row ? kNoTile  // only if the grid exceeds the tile count
              : j < plan.n_proj            ? kProjectionTile
                                           : kOutputTile;
  tile.col_block = j < plan.n_proj ? j : j - plan.n_proj;
  return tile;
}

__device__ __forceinline__ int* row_flag(const FusedGemmArgs& args, int row_block) {
  return args.schedule + kFlags + row_block;
}
__device__ __forceinline__ int* factor_flag(const FusedGemmArgs& args, const Plan& plan,
                                            int col_block) {
  return args.schedule + kFlags + plan.n_row + col_block;
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

// Increments `counter` once for the block (after every thread's stores, as publish()) and tells
// every thread whether this was increment number `total` (acquire side: the fence after the atomic
// orders the caller's later loads after every store released before the other increments).
__device__ __forceinline__ bool arrive_last(int* counter, int total) {
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(counter, 1) == total - 1;
    __threadfence();
  }
  __syncthreads();
  return last != 0;
}

// The end of every CTA: the last one to finish puts the schedule back to zero for the next launch.
__device__ __forceinline__ void finish(const FusedGemmArgs& args, const Plan& plan) {
  if (!arrive_last(args.schedule + kFinished, static_cast<int>(gridDim.x))) return;
  const int n = kFlags + plan.n_row + plan.n_factor;
  for (int i = threadIdx.x; i < n; i += kThreads) args.schedule[i] = 0;
}

// ---- Factor tiles and dM ----------------------------------------------------------------------
// Both are small products C (rows x cols, rows <= kBn, cols = R <= kMaxRank) = sum over k < depth of
// A(k, r) B(k, c) in fp32 with exact products (fmaf, in k order): E = F M' (k over R) and the dM
// part g^T z (k over a row block's tokens). outer_sum() stages kChunk values of k at a time in
// shared memory, A as (kChunk x kBn) and B as (kChunk x kMaxRank), and each thread accumulates 4 x 4
// blocks of C (kSteps of them): two 16-byte shared loads feed 16 FMAs, so neither product is bound
// by loads.

template <int kBn>
struct OuterBlocks {
  static constexpr int kSteps = (kBn / 4) * (kMaxRank / 4) / kThreads;
  static_assert(kSteps * kThreads == (kBn / 4) * (kMaxRank / 4), "whole 4 x 4 blocks per thread");
  float acc[kSteps][4][4];
};

// load_a(k, r) and load_b(k, c) are called for k < depth, r < rows, c < cols only.
template <int kBn, int kChunk, typename LoadA, typename LoadB>
__device__ void outer_sum(int depth, int rows, int cols, LoadA load_a, LoadB load_b, float* as,
                          float* bs, OuterBlocks<kBn>& c) {
  constexpr int kSteps = OuterBlocks<kBn>::kSteps;
  const int groups = cdiv(cols, 4), width = groups * 4, blocks = cdiv(rows, 4) * groups;
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) c.acc[s][i][j] = 0.f;
    }
  }
  for (int k0 = 0; k0 < depth; k0 += kChunk) {
    __syncthreads();  // the previous chunk (or the tile's main loop) is done with the buffers
    for (int i = threadIdx.x; i < kChunk * kBn; i += kThreads) {
      const int k = i / kBn, r = i % kBn;
      as[i] = k0 + k < depth && r < rows ? load_a(k0 + k, r) : 0.f;
    }
    for (int i = threadIdx.x; i < kChunk * width; i += kThreads) {
      const int k = i / width, col = i % width;
      bs[k * kMaxRank + col] = k0 + k < depth && col < cols ? load_b(k0 + k, col) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int b = threadIdx.x + s * kThreads;
      if (b < blocks) {
        const int r = (b / groups) * 4, col = (b % groups) * 4;
#pragma unroll 4
        for (int k = 0; k < kChunk; ++k) {
          const float4 av = *reinterpret_cast<const float4*>(as + k * kBn + r);
          const float4 bv = *reinterpret_cast<const float4*>(bs + k * kMaxRank + col);
          const float a4[4] = {av.x, av.y, av.z, av.w};
          const float b4[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) c.acc[s][i][j] = fmaf(a4[i], b4[j], c.acc[s][i][j]);
          }
        }
      }
    }
  }
}

// Calls store(r, c, value) for every element of the rows x cols result.
template <int kBn, typename Store>
__device__ void outer_store(int rows, int cols, const OuterBlocks<kBn>& c, Store store) {
  const int groups = cdiv(cols, 4), blocks = cdiv(rows, 4) * groups;
#pragma unroll
  for (int s = 0; s < OuterBlocks<kBn>::kSteps; ++s) {
    const int b = threadIdx.x + s * kThreads;
    if (b < blocks) {
      const int r = (b / groups) * 4, col = (b % groups) * 4;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (r + i < rows && col + j < cols) store(r + i, col + j, c.acc[s][i][j]);
        }
      }
    }
  }
}

// Rows n0 .. n0 + kBn of E = scale F M' (M' = M, or M^T when kTransposed), then the column tile's
// flag. as / bs: kChunk x kBn and kChunk x kMaxRank floats of the caller's shared memory.
template <typename Elem, bool kTransposed, int kBn, int kChunk>
__device__ void factor_tile(const FusedGemmArgs& args, const Plan& plan, int col_block, float* as,
                            float* bs) {
  const int N = static_cast<int>(args.n), R = static_cast<int>(args.rank);
  const int n0 = col_block * kBn;
  const Elem* f = static_cast<const Elem*>(args.factor) + n0 * (i64)R;
  const float* core = args.core;
  OuterBlocks<kBn> c;
  outer_sum<kBn, kChunk>(
      R, min(kBn, N - n0), R, [&](int k, int n) { return to_float(f[n * (i64)R + k]); },
      [&](int k, int j) { return kTransposed ? core[j * R + k] : core[k * R + j]; }, as, bs, c);
  float* e = args.e + n0 * (i64)R;
  const float scale = args.scale;
  outer_store(min(kBn, N - n0), R, c,
              [&](int n, int j, float v) { e[n * (i64)R + j] = v * scale; });
  publish(factor_flag(args, plan, col_block));
}

// The dM part of projection tile (row_block, col_block), which has just stored its proj32 (g)
// columns r0 .. r0 + kBn: slot[row_block][r][j] = sum over the row block's tokens t of
// g[t][r] z[t][j]. Then the projection tile that finishes last sums the slots in row-block order
// (the same order whichever tile is last: deterministic) into dm = scale * sum.
template <typename Elem, int kBm, int kBn, int kChunk>
__device__ void grad_m_part(const FusedGemmArgs& args, const Plan& plan, int row_block,
                            int col_block, float* as, float* bs) {
  const int M = static_cast<int>(args.m), R = static_cast<int>(args.rank);
  const int m0 = row_block * kBm, r0 = col_block * kBn;
  // this block's own stores of proj32, ordered before these loads by outer_sum's barriers
  const float* g = args.proj32 + m0 * (i64)R + r0;
  const Elem* side = static_cast<const Elem*>(args.side) + m0 * (i64)R;
  OuterBlocks<kBn> c;
  outer_sum<kBn, kChunk>(
      min(kBm, M - m0), min(kBn, R - r0), R, [&](int t, int r) { return g[t * (i64)R + r]; },
      [&](int t, int j) { return to_float(side[t * (i64)R + j]); }, as, bs, c);
  float* slot = args.part + row_block * (i64)R * R + r0 * (i64)R;
  outer_store(min(kBn, R - r0), R, c, [&](int r, int j, float v) { slot[r * (i64)R + j] = v; });
  if (!arrive_last(args.schedule + kGradDone, plan.n_row * plan.n_proj)) return;
  for (int i = threadIdx.x; i < R * R; i += kThreads) {
    float sum = 0.f;
    for (int rb = 0; rb < plan.n_row; ++rb) sum += __ldcg(args.part + rb * (i64)R * R + i);
    args.dm[i] = sum * args.scale;
  }
}

}  // namespace attrspace_kernels
