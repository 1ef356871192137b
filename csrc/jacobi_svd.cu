// The batched Jacobi SVD on the GPU: one thread block per matrix, the matrix and its rotations in
// shared memory, one warp per column pair of a round (the pairs of a round are disjoint).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "jacobi_svd.h"

namespace attrspace {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 16;

template <typename T>
__device__ T warp_sum(T x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  // Lanes may round the butterfly differently: take lane 0's value so that every lane of the warp
  // makes the same rotate / skip decision.
  return __shfl_sync(0xffffffffu, x, 0);
}

template <typename T>
__global__ void jacobi_svd_kernel(T* a_all, T* u_all, T* s_all, T* v_all, int32_t* info, int rows,
                                  int cols, int max_sweeps) {
  extern __shared__ unsigned char smem_raw[];
  T* a = reinterpret_cast<T*>(smem_raw);
  T* v = a + rows * cols;
  T* norm = v + cols * cols;
  int* order = reinterpret_cast<int*>(norm + cols);
  __shared__ int rotated;

  const int64_t b = blockIdx.x;
  const T* a_in = a_all + b * rows * cols;
  for (int k = threadIdx.x; k < rows * cols; k += blockDim.x) a[k] = a_in[k];
  for (int k = threadIdx.x; k < cols * cols; k += blockDim.x)
    v[k] = (k / cols == k % cols) ? T(1) : T(0);
  __syncthreads();

  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  const int even = cols + (cols & 1);
  const T tol = jacobi::tolerance<T>(rows);
  int sweeps = -1;
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    // Squared column norms, recomputed every sweep and updated after each rotation.
    for (int k = warp; k < cols; k += warps) {
      const T n2 = warp_sum(jacobi::dot(a + k * rows, a + k * rows, rows, lane, kWarp));
      if (lane == 0) norm[k] = n2;
    }
    if (threadIdx.x == 0) rotated = 0;
    __syncthreads();
    for (int round = 0; round < even - 1; ++round) {
      for (int slot = warp; slot < even / 2; slot += warps) {
        int i, j;
        jacobi::round_robin_pair(round, slot, even, &i, &j);
        if (j >= cols) continue;
        T* ai = a + i * rows;
        T* aj = a + j * rows;
        const T gamma = warp_sum(jacobi::dot(ai, aj, rows, lane, kWarp));
        T c, s, t;
        if (jacobi::rotation(norm[i], norm[j], gamma, tol, &c, &s, &t)) {
          jacobi::rotate_pair(ai, aj, rows, lane, kWarp, c, s);
          jacobi::rotate_pair(v + i * cols, v + j * cols, cols, lane, kWarp, c, s);
          __syncwarp();
          if (lane == 0) {
            norm[i] -= t * gamma;
            norm[j] += t * gamma;
            rotated = 1;
          }
        }
        __syncwarp();
      }
      __syncthreads();
    }
    const int any = rotated;
    __syncthreads();
    if (!any) {
      sweeps = sweep + 1;
      break;
    }
  }

  for (int k = threadIdx.x; k < cols; k += blockDim.x) {
    norm[k] = jacobi::sqrt_(jacobi::dot(a + k * rows, a + k * rows, rows, 0, 1));
  }
  __syncthreads();
  if (threadIdx.x == 0) jacobi::sort_descending(norm, cols, order);
  __syncthreads();
  T* u_out = u_all + b * rows * cols;
  T* s_out = s_all + b * cols;
  T* v_out = v_all + b * cols * cols;
  for (int k = warp; k < cols; k += warps) {
    if (lane == 0) s_out[k] = norm[order[k]];
    jacobi::write_column(a, v, norm, order[k], k, rows, cols, u_out, v_out, lane, kWarp);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    info[b] = sweeps;
    // A rank-deficient matrix leaves zero columns in U; complete them (rare, so serially).
    int resolved = 0;
    while (resolved < cols && norm[order[resolved]] > jacobi::Limits<T>::negligible) ++resolved;
    if (resolved < cols) {
      __threadfence_block();
      jacobi::complete_orthonormal(u_out, rows, cols, resolved);
    }
  }
}

template <typename T>
void launch(const JacobiSvdParams& p, cudaStream_t stream) {
  if (p.batch == 0) return;
  const size_t shared =
      (static_cast<size_t>(p.rows) * p.cols + static_cast<size_t>(p.cols) * p.cols + p.cols) *
          sizeof(T) +
      static_cast<size_t>(p.cols) * sizeof(int);
  int device = 0;
  int optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (shared > static_cast<size_t>(optin)) {
    throw std::invalid_argument("jacobi_svd_cuda: a " + std::to_string(p.rows) + " x " +
                                std::to_string(p.cols) + " matrix needs " + std::to_string(shared) +
                                " bytes of shared memory, the device offers " +
                                std::to_string(optin));
  }
  auto kernel = jacobi_svd_kernel<T>;
  if (shared > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(shared));
  }
  const int pairs = (p.cols + 1) / 2;
  const int warps = pairs < kMaxWarps ? pairs : kMaxWarps;
  kernel<<<static_cast<unsigned>(p.batch), warps * kWarp, shared, stream>>>(
      static_cast<T*>(p.a), static_cast<T*>(p.u), static_cast<T*>(p.s), static_cast<T*>(p.v),
      p.info, p.rows, p.cols, p.max_sweeps);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("jacobi_svd_cuda launch failed: ") +
                             cudaGetErrorString(err));
  }
}

}  // namespace

void jacobi_svd_cuda(const JacobiSvdParams& params, std::uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (params.is_double) {
    launch<double>(params, s);
  } else {
    launch<float>(params, s);
  }
}

}  // namespace attrspace
