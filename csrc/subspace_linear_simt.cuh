// fp32 tile of the fused adapter kernels: plain FMA (no TF32), so fp32 results match an fp32 GEMM.
// The adapter term proj32 E^T is one more pass of the same accumulation, over (proj32, E).
#pragma once

#include "subspace_linear_common.cuh"

namespace attrspace_kernels {
namespace simt {

constexpr int BM = kSimtBlockM, BN = kSimtBlockN, BK = kSimtBlockK;
constexpr int kStride = BM + 4;  // rows of the k-major tiles; keeps float4 reads 16-byte aligned
static_assert(BM == BN, "both tiles share kStride");
static_assert(BM * BK == 4 * kThreads && BM == 4 * (kThreads / 16),
              "4 loads and 4 x 4 outputs a thread");

typedef float Acc[4][4];

// acc += A[m0:m0+BM, :] B[:, n0:n0+BN] over the reduction Kd; out-of-range elements read as zero.
// Thread (ty, tx) = (tid / 16, tid % 16) owns rows ty*4.. and columns tx*4.. of the tile.
// kFromOtherCtas: A and B were written by other CTAs of this launch (proj32, E): read them through
// L2 (ld.global.cg), never a possibly stale L1 line.
template <int kLayout, bool kFromOtherCtas>
__device__ void accumulate(const float* a, i64 lda, const float* b, i64 ldb, int m0, int n0, int M,
                           int N, int Kd, Acc& acc, float* as, float* bs) {
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  for (int k0 = 0; k0 < Kd; k0 += BK) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // A tile, stored k-major: as[k][m]
      const int idx = tid + i * kThreads, row = idx >> 4, col = idx & 15;
      const int gm = m0 + row, gk = k0 + col;
      float v = 0.f;
      if (gm < M && gk < Kd) v = kFromOtherCtas ? __ldcg(a + gm * lda + gk) : a[gm * lda + gk];
      as[col * kStride + row] = v;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // B tile, stored k-major: bs[k][n]
      const int idx = tid + i * kThreads;
      if (kLayout == kNK) {
        const int row = idx >> 4, col = idx & 15, gn = n0 + row, gk = k0 + col;
        float v = 0.f;
        if (gn < N && gk < Kd) v = kFromOtherCtas ? __ldcg(b + gn * ldb + gk) : b[gn * ldb + gk];
        bs[col * kStride + row] = v;
      } else {
        const int krow = idx >> 6, col = idx & 63, gk = k0 + krow, gn = n0 + col;
        bs[krow * kStride + col] = gk < Kd && gn < N ? b[gk * ldb + gn] : 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      const float4 av = *reinterpret_cast<const float4*>(as + k * kStride + ty * 4);
      const float4 bv = *reinterpret_cast<const float4*>(bs + k * kStride + tx * 4);
      const float ar[4] = {av.x, av.y, av.z, av.w};
      const float br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
}

// k values staged at a time by the factor tiles and the dM parts: 8 x 64 and 8 x 128 floats
constexpr int kOuterChunk = 8;
static_assert(kOuterChunk * BN <= BK * kStride && kOuterChunk * kMaxRank <= BK * kStride,
              "the staged chunks fit the tile buffers");

// kGradM: the backward entry points, whose projection tiles may also form the dM parts (compiled
// there only: the forward's registers stay those of its main loops).
template <bool kGradM>
__device__ void projection_tile(const FusedGemmArgs& args, const Plan& plan, const Tile& tile,
                                float* as, float* bs) {
  const int M = static_cast<int>(args.m), Kd = static_cast<int>(args.kd);
  const int R = static_cast<int>(args.rank);
  const int m0 = tile.row_block * BM, n0 = tile.col_block * BN;
  const int row0 = m0 + (threadIdx.x >> 4) * 4, col0 = n0 + (threadIdx.x & 15) * 4;
  Acc acc = {};
  accumulate<kKN, false>(static_cast<const float*>(args.a), Kd,
                         static_cast<const float*>(args.b_proj), R, m0, n0, M, R, Kd, acc, as, bs);
  float* proj = static_cast<float*>(args.proj);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int gm = row0 + i, gr = col0 + j;
      if (gm < M && gr < R) {
        args.proj32[gm * (i64)R + gr] = acc[i][j];
        if (proj != nullptr) proj[gm * (i64)R + gr] = acc[i][j];
      }
    }
  }
  publish(row_flag(args, tile.row_block));
  if constexpr (kGradM) {
    if (args.dm != nullptr) {
      grad_m_part<float, BM, BN, kOuterChunk>(args, plan, tile.row_block, tile.col_block, as, bs);
    }
  }
}

template <int kMainLayout>
__device__ void output_tile(const FusedGemmArgs& args, const Plan& plan, const Tile& tile,
                            float* as, float* bs) {
  const int M = static_cast<int>(args.m), N = static_cast<int>(args.n);
  const int Kd = static_cast<int>(args.kd), R = static_cast<int>(args.rank);
  const int m0 = tile.row_block * BM, n0 = tile.col_block * BN;
  const int row0 = m0 + (threadIdx.x >> 4) * 4, col0 = n0 + (threadIdx.x & 15) * 4;
  const i64 ldb = kMainLayout == kNK ? Kd : N;
  Acc acc = {};
  accumulate<kMainLayout, false>(static_cast<const float*>(args.a), Kd,
                                 static_cast<const float*>(args.b_main), ldb, m0, n0, M, N, Kd,
                                 acc, as, bs);
  wait_until(row_flag(args, tile.row_block), plan.n_proj);
  if (plan.n_factor > 0) wait_until(factor_flag(args, plan, tile.col_block), 1);
  accumulate<kNK, true>(args.proj32, R, args.e, R, m0, n0, M, N, R, acc, as, bs);
  const float* bias = static_cast<const float*>(args.bias);
  float* out = static_cast<float*>(args.out);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int gn = col0 + j;
    if (gn >= N) continue;
    const float b = bias != nullptr ? bias[gn] : 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (row0 + i < M) out[(row0 + i) * (i64)N + gn] = acc[i][j] + b;
    }
  }
}

// One CTA of a launch: the tile its ticket names, then the schedule's end-of-launch bookkeeping.
template <int kMainLayout>
__device__ void fused_tile(const FusedGemmArgs& args) {
  __shared__ __align__(16) float as[BK * kStride];
  __shared__ __align__(16) float bs[BK * kStride];
  const Plan plan = make_plan(args, BM, BN);
  const Tile tile = take_tile(args.schedule, plan);
  if (tile.kind == kFactorTile) {
    factor_tile<float, kMainLayout == kKN, BN, kOuterChunk>(args, plan, tile.col_block, as, bs);
  } else if (tile.kind == kProjectionTile) {
    projection_tile<kMainLayout == kKN>(args, plan, tile, as, bs);
  } else if (tile.kind == kOutputTile) {
    output_tile<kMainLayout>(args, plan, tile, as, bs);
  }
  finish(args, plan);
}

}  // namespace simt
}  // namespace attrspace_kernels
