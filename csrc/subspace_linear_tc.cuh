// Tensor-core tile of the fused adapter kernels (fp16 and bf16 inputs, fp32 accumulators, sm_80+).
// mma.sync m16n8k16 for the main products; the adapter term proj32 E^T, whose operands are fp32,
// runs as m16n8k8 TF32 MMAs (10-bit mantissa inputs, fp32 accumulation) in the same accumulators.
#pragma once

#include "subspace_linear_common.cuh"

namespace attrspace_kernels {
namespace tc {

constexpr int BM = kTcBlockM, BN = kTcBlockN, BK = kTcBlockK;
constexpr int kWarpM = 64, kWarpN = 32;  // 2 x 4 warps
constexpr int kMTiles = kWarpM / 16, kNTiles = kWarpN / 8;
// Shared-memory row strides (in elements) padded by 16 bytes, so the 8 row addresses of one
// ldmatrix phase fall in 8 different 16-byte bank groups: 80 B rows (5 groups apart) for tiles
// stored k-contiguous, 272 B rows (17 groups apart) for the n-contiguous B tile.
constexpr int kStrideK = BK + 8;
constexpr int kStrideN = BN + 8;
constexpr int kATile = BM * kStrideK;
constexpr int kBTile = BN * kStrideK > BK* kStrideN ? BN* kStrideK : BK* kStrideN;
constexpr int kStage = kATile + kBTile;  // elements
constexpr int kStages = 2;               // double buffer: 40 KB of static shared memory
constexpr int kSmemBytes = kStages * kStage * 2;
// Adapter epilogue: rank chunks of 32 fp32 columns, rows padded to 36 floats so a fragment load
// (8 rows x 4 columns) touches 32 different banks.
constexpr int kRankChunk = 32;
constexpr int kStrideE = kRankChunk + 4;
static_assert((BM + BN) * kStrideE * 4 <= kSmemBytes,
              "epilogue tiles must fit the pipeline buffers");
static_assert(kThreads == 32 * (BM / kWarpM) * (BN / kWarpN), "warp layout");

typedef float Acc[kMTiles][kNTiles][4];

// Copies 8 consecutive elements (16 bytes) to shared memory; `count` of them are valid, the rest
// become zero. cp.async needs a 16-byte aligned source, which `vec_ok` vouches for.
template <typename Elem>
__device__ __forceinline__ void load_chunk8(Elem* dst, const Elem* src, int count, bool vec_ok) {
  if (count >= 8 && vec_ok) {
    cp_async_16(dst, src);
    return;
  }
  const unsigned short* s = reinterpret_cast<const unsigned short*>(src);
  unsigned v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = j < count ? s[j] : 0u;
  *reinterpret_cast<uint4*>(dst) = make_uint4(v[0] | (v[1] << 16), v[2] | (v[3] << 16),
                                              v[4] | (v[5] << 16), v[6] | (v[7] << 16));
}

__device__ __forceinline__ bool vector_ok(const void* base, i64 ld) {
  return (reinterpret_cast<unsigned long long>(base) & 15ull) == 0 && (ld & 7) == 0;
}

// Loads k-tile `kt` of A (BM x BK) and B (BK x BN) into one pipeline stage.
template <typename Elem, int kLayout>
__device__ __forceinline__ void load_stage(Elem* stage, const Elem* a, i64 lda, bool a_vec,
                                           const Elem* b, i64 ldb, bool b_vec, int m0, int n0,
                                           int M, int N, int Kd, int kt) {
  const int tid = threadIdx.x, k0 = kt * BK;
  Elem* as = stage;
  Elem* bs = stage + kATile;
#pragma unroll
  for (int i = 0; i < (BM * BK / 8) / kThreads; ++i) {  // rows of A: 4 chunks of 8 along k
    const int c = tid + i * kThreads, row = c >> 2, kc = (c & 3) * 8;
    const int gm = m0 + row, gk = k0 + kc;
    const int count = gm < M ? min(8, Kd - gk) : 0;
    load_chunk8(as + row * kStrideK + kc, count > 0 ? a + gm * lda + gk : a, count, a_vec);
  }
  if (kLayout == kNK) {
#pragma unroll
    for (int i = 0; i < (BN * BK / 8) / kThreads; ++i) {  // rows of B^T: 4 chunks along k
      const int c = tid + i * kThreads, row = c >> 2, kc = (c & 3) * 8;
      const int gn = n0 + row, gk = k0 + kc;
      const int count = gn < N ? min(8, Kd - gk) : 0;
      load_chunk8(bs + row * kStrideK + kc, count > 0 ? b + gn * ldb + gk : b, count, b_vec);
    }
  } else {
#pragma unroll
    for (int i = 0; i < (BK * BN / 8) / kThreads; ++i) {  // rows of B: 16 chunks along n
      const int c = tid + i * kThreads, krow = c >> 4, nc = (c & 15) * 8;
      const int gk = k0 + krow, gn = n0 + nc;
      const int count = gk < Kd ? min(8, N - gn) : 0;
      load_chunk8(bs + krow * kStrideN + nc, count > 0 ? b + gk * ldb + gn : b, count, b_vec);
    }
  }
}

// acc += A[m0:m0+BM, :] B[:, n0:n0+BN] over the whole reduction Kd (rows >= M, columns >= N and
// k >= Kd read as zero). Warp-uniform skips leave sub-tiles past M or N untouched.
template <typename Elem, int kLayout>
__device__ void mainloop(const Elem* a, i64 lda, const Elem* b, i64 ldb, int m0, int n0, int M,
                         int N, int Kd, Acc& acc, Elem* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int m_live = live_tiles(M - (m0 + wm * kWarpM), 16, kMTiles);
  const int n_live = live_tiles(N - (n0 + wn * kWarpN), 8, kNTiles);
  const bool a_vec = vector_ok(a, lda), b_vec = vector_ok(b, ldb);
  const int nk = cdiv(Kd, BK);

  load_stage<Elem, kLayout>(smem, a, lda, a_vec, b, ldb, b_vec, m0, n0, M, N, Kd, 0);
  cp_async_commit();
  for (int kt = 0; kt < nk; ++kt) {
    // The stage refilled here was last read in iteration kt - 1, which ended with a barrier.
    if (kt + 1 < nk) {
      load_stage<Elem, kLayout>(smem + ((kt + 1) & 1) * kStage, a, lda, a_vec, b, ldb, b_vec, m0,
                                n0, M, N, Kd, kt + 1);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the group just committed: tile kt has landed
    __syncthreads();
    const Elem* as = smem + (kt & 1) * kStage;
    const Elem* bs = as + kATile;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      unsigned af[kMTiles][4];
      unsigned bf[kNTiles][2];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        if (mt < m_live) {
          const int row = wm * kWarpM + mt * 16 + (lane & 15);
          ldmatrix_x4(af[mt], as + row * kStrideK + ks * 16 + (lane >> 4) * 8);
        }
      }
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        if (2 * np < n_live) {
          unsigned r[4];
          if (kLayout == kNK) {  // 8x8 matrices (n, k): n 0-7 | k 0-7, k 8-15; n 8-15 | same
            const int row = wn * kWarpN + np * 16 + (lane & 7) + ((lane >> 4) << 3);
            ldmatrix_x4(r, bs + row * kStrideK + ks * 16 + ((lane >> 3) & 1) * 8);
          } else {  // 8x8 matrices (k, n), transposed on load into the same fragments
            const int krow = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
            ldmatrix_x4_trans(r, bs + krow * kStrideN + wn * kWarpN + np * 16 + (lane >> 4) * 8);
          }
          bf[2 * np][0] = r[0];
          bf[2 * np][1] = r[1];
          bf[2 * np + 1][0] = r[2];
          bf[2 * np + 1][1] = r[3];
        }
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          if (mt < m_live && nt < n_live) mma_16816(acc[mt][nt], af[mt], bf[nt], a);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
}

// acc += proj32[m0:m0+BM, :] E[n0:n0+BN, :]^T with TF32 MMAs. proj32 (and E, when factor tiles
// formed it) was written by other CTAs during this launch, so both are read through L2
// (ld.global.cg), never a possibly stale L1 line.
__device__ void adapter_epilogue(const float* proj32, const float* e, int m0, int n0, int M, int N,
                                 int R, Acc& acc, float* smem) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t = lane & 3;
  const int m_live = live_tiles(M - (m0 + wm * kWarpM), 16, kMTiles);
  const int n_live = live_tiles(N - (n0 + wn * kWarpN), 8, kNTiles);
  float* zs = smem;                  // (BM, kStrideE)
  float* es = smem + BM * kStrideE;  // (BN, kStrideE)
  for (int r0 = 0; r0 < R; r0 += kRankChunk) {
    __syncthreads();  // the previous chunk (or the main loop) is done with the buffers
    for (int i = tid; i < BM * kRankChunk; i += kThreads) {
      const int row = i / kRankChunk, col = i % kRankChunk, gm = m0 + row, gr = r0 + col;
      zs[row * kStrideE + col] = gm < M && gr < R ? __ldcg(proj32 + gm * (i64)R + gr) : 0.f;
    }
    for (int i = tid; i < BN * kRankChunk; i += kThreads) {
      const int row = i / kRankChunk, col = i % kRankChunk, gn = n0 + row, gr = r0 + col;
      es[row * kStrideE + col] = gn < N && gr < R ? __ldcg(e + gn * (i64)R + gr) : 0.f;
    }
    __syncthreads();
    const int k_steps = min(kRankChunk / 8, cdiv(R - r0, 8));
#pragma unroll
    for (int ks = 0; ks < kRankChunk / 8; ++ks) {
      if (ks < k_steps) {
        unsigned af[kMTiles][4];
        unsigned bf[kNTiles][2];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          if (mt < m_live) {  // a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
            const float* p = zs + (wm * kWarpM + mt * 16 + g) * kStrideE + ks * 8 + t;
            af[mt][0] = to_tf32(p[0]);
            af[mt][1] = to_tf32(p[8 * kStrideE]);
            af[mt][2] = to_tf32(p[4]);
            af[mt][3] = to_tf32(p[8 * kStrideE + 4]);
          }
        }
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          if (nt < n_live) {  // b0 (k t, n g), b1 (k t+4, n g)
            const float* q = es + (wn * kWarpN + nt * 8 + g) * kStrideE + ks * 8 + t;
            bf[nt][0] = to_tf32(q[0]);
            bf[nt][1] = to_tf32(q[4]);
          }
        }
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
            if (mt < m_live && nt < n_live) mma_1688_tf32(acc[mt][nt], af[mt], bf[nt]);
          }
        }
      }
    }
  }
}

// Accumulator element (mt, nt, i) sits at row wm*64 + mt*16 + lane/4 + 8*(i/2) and column
// wn*32 + nt*8 + 2*(lane%4) + i%2 of the CTA tile.
__device__ __forceinline__ void fragment_origin(int& row, int& col) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  row = (warp >> 2) * kWarpM + (lane >> 2);
  col = (warp & 3) * kWarpN + 2 * (lane & 3);
}

template <typename Elem>
__device__ void store_projection(const Acc& acc, float* proj32, Elem* proj, int m0, int n0, int M,
                                 int R) {
  int row0, col0;
  fragment_origin(row0, col0);
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int gm = m0 + row0 + mt * 16 + 8 * (i >> 1), gr = n0 + col0 + nt * 8 + (i & 1);
        if (gm < M && gr < R) {
          proj32[gm * (i64)R + gr] = acc[mt][nt][i];
          if (proj != nullptr) store(proj + gm * (i64)R + gr, acc[mt][nt][i]);
        }
      }
    }
  }
}

template <typename Elem>
__device__ void store_output(const Acc& acc, const Elem* bias, Elem* out, int m0, int n0, int M,
                             int N) {
  int row0, col0;
  fragment_origin(row0, col0);
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
    const int gn = n0 + col0 + nt * 8;  // even; gn + 1 is the pair's second column
    if (gn >= N) continue;
    const bool pair = gn + 1 < N;
    const float b0 = bias != nullptr ? to_float(bias[gn]) : 0.f;
    const float b1 = bias != nullptr && pair ? to_float(bias[gn + 1]) : 0.f;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int gm = m0 + row0 + mt * 16 + 8 * h;
        if (gm >= M) continue;
        Elem* dst = out + gm * (i64)N + gn;
        const float v0 = acc[mt][nt][2 * h] + b0, v1 = acc[mt][nt][2 * h + 1] + b1;
        if (pair && (reinterpret_cast<unsigned long long>(dst) & 3ull) == 0) {
          store_pair(dst, v0, v1);
        } else {
          store(dst, v0);
          if (pair) store(dst + 1, v1);
        }
      }
    }
  }
}

// k values staged at a time by the factor tiles and the dM parts: 32 x 128 floats each
constexpr int kOuterChunk = 32;
static_assert(kOuterChunk * (BN + kMaxRank) * 4 <= kSmemBytes, "the staged chunks fit the buffers");

// kGradM: the backward entry points, whose projection tiles may also form the dM parts (compiled
// there only: the forward's registers stay those of its main loops).
template <typename Elem, bool kGradM>
__device__ void projection_tile(const FusedGemmArgs& args, const Plan& plan, const Tile& tile,
                                unsigned char* smem) {
  const int M = static_cast<int>(args.m), Kd = static_cast<int>(args.kd);
  const int R = static_cast<int>(args.rank);
  const int m0 = tile.row_block * BM, n0 = tile.col_block * BN;
  Acc acc = {};
  mainloop<Elem, kKN>(static_cast<const Elem*>(args.a), Kd, static_cast<const Elem*>(args.b_proj),
                      R, m0, n0, M, R, Kd, acc, reinterpret_cast<Elem*>(smem));
  store_projection(acc, args.proj32, static_cast<Elem*>(args.proj), m0, n0, M, R);
  publish(row_flag(args, tile.row_block));
  if constexpr (kGradM) {
    if (args.dm != nullptr) {
      float* gs = reinterpret_cast<float*>(smem);
      grad_m_part<Elem, BM, BN, kOuterChunk>(args, plan, tile.row_block, tile.col_block, gs,
                                             gs + kOuterChunk * BN);
    }
  }
}

template <typename Elem, int kMainLayout>
__device__ void output_tile(const FusedGemmArgs& args, const Plan& plan, const Tile& tile,
                            unsigned char* smem) {
  const int M = static_cast<int>(args.m), N = static_cast<int>(args.n);
  const int Kd = static_cast<int>(args.kd), R = static_cast<int>(args.rank);
  const int m0 = tile.row_block * BM, n0 = tile.col_block * BN;
  const i64 ldb = kMainLayout == kNK ? Kd : N;
  Acc acc = {};
  mainloop<Elem, kMainLayout>(static_cast<const Elem*>(args.a), Kd,
                              static_cast<const Elem*>(args.b_main), ldb, m0, n0, M, N, Kd, acc,
                              reinterpret_cast<Elem*>(smem));
  wait_until(row_flag(args, tile.row_block), plan.n_proj);
  if (plan.n_factor > 0) wait_until(factor_flag(args, plan, tile.col_block), 1);
  adapter_epilogue(args.proj32, args.e, m0, n0, M, N, R, acc, reinterpret_cast<float*>(smem));
  store_output(acc, static_cast<const Elem*>(args.bias), static_cast<Elem*>(args.out), m0, n0, M,
               N);
}

// One CTA of a launch: the tile its ticket names, then the schedule's end-of-launch bookkeeping.
template <typename Elem, int kMainLayout>
__device__ void fused_tile(const FusedGemmArgs& args) {
  __shared__ __align__(16) unsigned char smem[kSmemBytes];
  const Plan plan = make_plan(args, BM, BN);
  const Tile tile = take_tile(args.schedule, plan);
  if (tile.kind == kFactorTile) {
    float* as = reinterpret_cast<float*>(smem);
    factor_tile<Elem, kMainLayout == kKN, BN, kOuterChunk>(args, plan, tile.col_block, as,
                                                           as + kOuterChunk * BN);
  } else if (tile.kind == kProjectionTile) {
    projection_tile<Elem, kMainLayout == kKN>(args, plan, tile, smem);
  } else if (tile.kind == kOutputTile) {
    output_tile<Elem, kMainLayout>(args, plan, tile, smem);
  }
  finish(args, plan);
}

}  // namespace tc
}  // namespace attrspace_kernels
