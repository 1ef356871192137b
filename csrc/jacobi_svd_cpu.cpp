// The batched Jacobi SVD on the CPU: one matrix per task, tasks shared by a few std::threads.
#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "jacobi_svd.h"

namespace attrspace {
namespace {

// a . b with eight partial sums: the compiler vectorises it (a single running sum it may not
// reorder).
template <typename T>
T dot_contiguous(const T* x, const T* y, int n) {
  T acc[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  int k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += x[k + l] * y[k + l];
  }
  T total = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; k < n; ++k) total += x[k] * y[k];
  return total;
}

// Sweeps of round-robin rotations on one column-major matrix a (rows x cols) with v = I at the
// start; norm2 is scratch for the squared column norms (recomputed every sweep, updated after each
// rotation). Returns the sweeps used, or -1 when max_sweeps did not reach the tolerance.
template <typename T>
int sweep_serial(T* a, T* v, T* norm2, int rows, int cols, int max_sweeps) {
  const int even = cols + (cols & 1);
  const T tol = jacobi::tolerance<T>(rows);
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    for (int k = 0; k < cols; ++k) {
      const T* ak = a + static_cast<int64_t>(k) * rows;
      norm2[k] = dot_contiguous(ak, ak, rows);
    }
    bool rotated = false;
    for (int round = 0; round < even - 1; ++round) {
      for (int slot = 0; slot < even / 2; ++slot) {
        int i, j;
        jacobi::round_robin_pair(round, slot, even, &i, &j);
        if (j >= cols) continue;
        T* ai = a + static_cast<int64_t>(i) * rows;
        T* aj = a + static_cast<int64_t>(j) * rows;
        const T gamma = dot_contiguous(ai, aj, rows);
        T c, s, t;
        if (jacobi::rotation(norm2[i], norm2[j], gamma, tol, &c, &s, &t)) {
          jacobi::rotate_pair(ai, aj, rows, 0, 1, c, s);
          jacobi::rotate_pair(v + static_cast<int64_t>(i) * cols,
                              v + static_cast<int64_t>(j) * cols, cols, 0, 1, c, s);
          norm2[i] -= t * gamma;
          norm2[j] += t * gamma;
          rotated = true;
        }
      }
    }
    if (!rotated) return sweep + 1;
  }
  return -1;
}

template <typename T>
void svd_one(const JacobiSvdParams& p, int64_t b, std::vector<T>& v, std::vector<T>& norm,
             std::vector<int>& order) {
  const int rows = p.rows;
  const int cols = p.cols;
  T* a = static_cast<T*>(p.a) + b * rows * cols;
  T* u_out = static_cast<T*>(p.u) + b * rows * cols;
  T* s_out = static_cast<T*>(p.s) + b * cols;
  T* v_out = static_cast<T*>(p.v) + b * cols * cols;
  std::fill(v.begin(), v.end(), T(0));
  for (int k = 0; k < cols; ++k) v[static_cast<int64_t>(k) * cols + k] = T(1);
  p.info[b] = sweep_serial(a, v.data(), norm.data(), rows, cols, p.max_sweeps);
  for (int k = 0; k < cols; ++k) {
    const T* ak = a + static_cast<int64_t>(k) * rows;
    norm[k] = jacobi::sqrt_(dot_contiguous(ak, ak, rows));
  }
  jacobi::sort_descending(norm.data(), cols, order.data());
  for (int k = 0; k < cols; ++k) {
    s_out[k] = norm[order[k]];
    jacobi::write_column(a, v.data(), norm.data(), order[k], k, rows, cols, u_out, v_out, 0, 1);
  }
  const int resolved = jacobi::resolved_count(s_out, cols);
  if (resolved < cols) jacobi::complete_orthonormal(u_out, rows, cols, resolved);
}

template <typename T>
void run(const JacobiSvdParams& p, int threads) {
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    std::vector<T> v(static_cast<size_t>(p.cols) * p.cols);
    std::vector<T> norm(p.cols);
    std::vector<int> order(p.cols);
    for (int64_t b = next++; b < p.batch; b = next++) svd_one<T>(p, b, v, norm, order);
  };
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(threads, p.batch));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < n_threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}

}  // namespace

void jacobi_svd_cpu(const JacobiSvdParams& params, int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (params.is_double) {
    run<double>(params, threads);
  } else {
    run<float>(params, threads);
  }
}

}  // namespace attrspace
