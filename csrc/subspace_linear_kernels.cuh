// Entry points of the fused adapter kernels: one per pass and dtype, extern "C" so that the nvcc
// build (subspace_linear.cu) and the NVRTC JIT (attrspace/backends/cupy_jit.py) find them by the same plain
// names. They take the FusedGemmArgs fields as 19 scalar parameters (every JIT launcher can pass
// scalars; not every one can pass a struct). Launch: kThreads threads per block, one block per
// tile, n_factor + n_row * (n_proj + n_out) blocks (see subspace_linear_common.cuh), no dynamic
// shared memory; the schedule is zero at launch and the launch leaves it zero (no memset).
#pragma once

#include "subspace_linear_simt.cuh"
#include "subspace_linear_tc.cuh"

namespace attrspace_kernels {

#define ATTRSPACE_KERNEL_PARAMS                                                                 \
  const void *a, const void *b_main, const void *b_proj, const void *bias, float *e, void *out,  \
      float *proj32, void *proj, int *schedule, const void *factor, const float *core,            \
      const void *side, float *dm, float *part, long long m, long long n, long long kd,           \
      long long rank, float scale

__device__ __forceinline__ FusedGemmArgs pack_args(ATTRSPACE_KERNEL_PARAMS) {
  FusedGemmArgs args;
  args.a = a;
  args.b_main = b_main;
  args.b_proj = b_proj;
  args.bias = bias;
  args.e = e;
  args.out = out;
  args.proj32 = proj32;
  args.proj = proj;
  args.schedule = schedule;
  args.factor = factor;
  args.core = core;
  args.side = side;
  args.dm = dm;
  args.part = part;
  args.m = m;
  args.n = n;
  args.kd = kd;
  args.rank = rank;
  args.scale = scale;
  return args;
}

// One resident block per SM is asked of ptxas, not two: two cap a thread at 128 registers, and the
// tensor-core tiles then spill 36-40 bytes per thread inside the main loop (ptxas -v, sm_80 and
// sm_90); with one they take 168 registers and spill nothing (tests/kernels/test_static.py).
// The fp32 SIMT tiles ask for two: without a count ptxas aimed at three blocks (80 registers) and
// spilled 4-12 bytes in the factor / dM code; two allow 128 and it spills nothing.
#define ATTRSPACE_PACKED                                                                     \
  pack_args(a, b_main, b_proj, bias, e, out, proj32, proj, schedule, factor, core, side, dm, part, \
            m, n, kd, rank, scale)

extern "C" __global__ void __launch_bounds__(kThreads, 2)
    attrspace_forward_f32(ATTRSPACE_KERNEL_PARAMS) {
  simt::fused_tile<kNK>(ATTRSPACE_PACKED);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    attrspace_forward_f16(ATTRSPACE_KERNEL_PARAMS) {
  tc::fused_tile<__half, kNK>(ATTRSPACE_PACKED);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    attrspace_forward_bf16(ATTRSPACE_KERNEL_PARAMS) {
  tc::fused_tile<__nv_bfloat16, kNK>(ATTRSPACE_PACKED);
}
extern "C" __global__ void __launch_bounds__(kThreads, 2)
    attrspace_backward_f32(ATTRSPACE_KERNEL_PARAMS) {
  simt::fused_tile<kKN>(ATTRSPACE_PACKED);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    attrspace_backward_f16(ATTRSPACE_KERNEL_PARAMS) {
  tc::fused_tile<__half, kKN>(ATTRSPACE_PACKED);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    attrspace_backward_bf16(ATTRSPACE_KERNEL_PARAMS) {
  tc::fused_tile<__nv_bfloat16, kKN>(ATTRSPACE_PACKED);
}

#undef ATTRSPACE_PACKED
#undef ATTRSPACE_KERNEL_PARAMS

}  // namespace attrspace_kernels
