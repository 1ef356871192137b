// Host launchers of the fused adapter kernels (device code: subspace_linear_kernels.cuh).
// Each pass is one launch on the caller's stream, and nothing else: the schedule the caller passes is
// zero and the launch's last CTA puts it back to zero (subspace_linear_common.cuh).
#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "attrspace.h"
#include "check.cuh"
#include "subspace_linear_kernels.cuh"

namespace attrspace {
namespace {

namespace k = attrspace_kernels;
using Kernel = void (*)(const void*, const void*, const void*, const void*, float*, void*, float*,
                        void*, int*, const void*, const float*, const void*, float*, float*,
                        long long, long long, long long, long long, float);

static_assert(k::kTcBlockM >= 64 && k::kSimtBlockM >= 64 && k::kTcBlockN >= 64 &&
                  k::kSimtBlockN >= 64,
              "schedule_ints() and grad_part_floats() size for tiles of at least 64 x 64");
static_assert(k::kMaxRank == kMaxRank, "one rank limit");

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

void require(const void* pointer, const char* name) {
  if (pointer == nullptr) throw std::invalid_argument(std::string(name) + " must not be null");
}

void launch(Kernel kernel, const k::FusedGemmArgs& args, DType dtype,
            std::uintptr_t stream_handle) {
  // The kernels index within a matrix dimension with 32-bit ints (products in 64 bits).
  for (int64_t size : {args.m, args.n, args.kd, args.rank}) {
    if (size >= (int64_t{1} << 30))
      throw std::invalid_argument("sizes of 2^30 or more are not supported");
  }
  const bool fp32 = dtype == DType::kFloat32;
  const int64_t block_m = fp32 ? k::kSimtBlockM : k::kTcBlockM;
  const int64_t block_n = fp32 ? k::kSimtBlockN : k::kTcBlockN;
  const int64_t n_row = cdiv(args.m, block_m);
  const int64_t n_out = args.out != nullptr ? cdiv(args.n, block_n) : 0;
  const int64_t n_factor = args.factor != nullptr ? n_out : 0;
  const int64_t tiles = n_factor + n_row * (cdiv(args.rank, block_n) + n_out);
  if (tiles > INT_MAX) throw std::invalid_argument("too many tiles for one launch");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  kernel<<<static_cast<unsigned>(tiles), k::kThreads, 0, stream>>>(
      args.a, args.b_main, args.b_proj, args.bias, args.e, args.out, args.proj32, args.proj,
      args.schedule, args.factor, args.core, args.side, args.dm, args.part, args.m, args.n,
      args.kd, args.rank, args.scale);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void subspace_forward_cuda(const SubspaceForwardParams& p, std::uintptr_t stream) {
  if (p.tokens == 0) return;
  require(p.x, "x");
  require(p.w, "w");
  require(p.v, "v");
  require(p.p, "p");
  require(p.y, "y");
  require(p.z, "z");
  require(p.z_fp32, "z_fp32");
  require(p.schedule, "schedule");
  k::FusedGemmArgs args{};
  args.a = p.x;
  args.b_main = p.w;  // B(k, n) = W[n][k]
  args.b_proj = p.v;
  args.bias = p.bias;
  args.e = p.p;
  args.out = p.y;
  args.proj32 = p.z_fp32;
  args.proj = p.z;
  args.schedule = p.schedule;
  args.factor = p.u;  // P = scale U M, M read as stored
  args.core = p.m;
  args.scale = p.scale;
  if (p.u != nullptr) require(p.m, "m");
  args.m = p.tokens;
  args.n = p.d_out;
  args.kd = p.d_in;
  args.rank = p.rank;
  const Kernel kernel = by_dtype<Kernel>(p.dtype, k::attrspace_forward_f32,
                                         k::attrspace_forward_f16, k::attrspace_forward_bf16);
  launch(kernel, args, p.dtype, stream);
}

void subspace_backward_cuda(const SubspaceBackwardParams& p, std::uintptr_t stream) {
  if (p.tokens == 0) return;
  require(p.dy, "dy");
  require(p.w, "w");
  require(p.u, "u");
  require(p.q, "q");
  require(p.g, "g");
  require(p.schedule, "schedule");
  k::FusedGemmArgs args{};
  args.a = p.dy;
  args.b_main = p.w;  // dx = dy W reduces over d_out: B(k, n) = W[k][n], W read as stored
  args.b_proj = p.u;
  args.bias = nullptr;
  args.e = p.q;
  args.out = p.dx;  // null: only g
  args.proj32 = p.g;
  args.proj = nullptr;
  args.schedule = p.schedule;
  args.factor = p.v;  // Q = scale V M^T: the backward entry points read M transposed
  args.core = p.m;
  args.side = p.z;
  args.dm = p.dm;
  args.part = p.part;
  args.scale = p.scale;
  if (p.v != nullptr) require(p.m, "m");
  if (p.dm != nullptr) {
    require(p.z, "z");
    require(p.part, "part");
  }
  args.m = p.tokens;
  args.n = p.d_in;
  args.kd = p.d_out;
  args.rank = p.rank;
  const Kernel kernel = by_dtype<Kernel>(p.dtype, k::attrspace_backward_f32,
                                         k::attrspace_backward_f16, k::attrspace_backward_bf16);
  launch(kernel, args, p.dtype, stream);
}

}  // namespace attrspace
