// Batched one-sided Jacobi SVD (Hestenes), written once for both compilers: the CPU driver
// (jacobi_svd_cpu.cpp, g++) runs the rotations of a round one after another, the GPU kernel
// (jacobi_svd.cu, nvcc) runs them in parallel, one warp per column pair and one thread block per
// matrix. Both use the pair ordering, the rotation, the stopping rule and the finishing steps
// defined here. No Torch and no CUDA headers.
//
// Storage: every matrix is column-major (column k of A at a + k * rows). For A (rows x cols), rows
// >= cols, the rotations orthogonalise the columns: A J = W with W^T W diagonal, J orthogonal (the
// product of the rotations). Then sigma_k = |w_k|, u_k = w_k / sigma_k, v_k = J e_k, sorted so that
// sigma is descending.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define ATTRSPACE_HD __host__ __device__ inline
#else
#define ATTRSPACE_HD inline
#endif

namespace pybind11 {
class module_;
}

namespace attrspace {

// One batch: a (batch, cols, rows) is A^T row-major, i.e. each A column-major (the CPU driver uses
// it as workspace and overwrites it; the GPU kernel copies it to shared memory); u (batch, cols,
// rows) and v (batch, cols, cols) receive U and V column-major, s (batch, cols) the singular
// values; info[b] = sweeps used, or -1 when max_sweeps were not enough.
struct JacobiSvdParams {
  void* a;
  void* u;
  void* s;
  void* v;
  int32_t* info;
  int64_t batch;
  int32_t rows, cols;
  bool is_double;  // float64 when true, float32 otherwise
  int32_t max_sweeps;
};

constexpr int32_t kJacobiMaxCols = 256;

void jacobi_svd_cpu(const JacobiSvdParams& params, int threads);             // jacobi_svd_cpu.cpp
void jacobi_svd_cuda(const JacobiSvdParams& params, std::uintptr_t stream);  // jacobi_svd.cu
void register_svd(pybind11::module_& m);                                     // bindings_svd.cpp

namespace jacobi {

ATTRSPACE_HD float sqrt_(float x) { return sqrtf(x); }
ATTRSPACE_HD double sqrt_(double x) { return sqrt(x); }
ATTRSPACE_HD float abs_(float x) { return fabsf(x); }
ATTRSPACE_HD double abs_(double x) { return fabs(x); }

template <typename T>
struct Limits;
template <>
struct Limits<float> {
  static constexpr float eps = 1.1920929e-07f;
  // Below this a column's squared norm underflows, so its direction is not resolved.
  static constexpr float negligible = 1.0842022e-19f;  // sqrt(smallest normal)
  static constexpr float inv_sqrt_eps = 2896.3093f;
};
template <>
struct Limits<double> {
  static constexpr double eps = 2.220446049250313e-16;
  static constexpr double negligible = 1.4916681462400413e-154;
  static constexpr double inv_sqrt_eps = 67108864.0;
};

// Columns i and j are orthogonal enough when |a_i . a_j| <= tol |a_i| |a_j|. rows * eps stays above
// the rounding error of the dot product, so the sweeps stop instead of chasing noise.
template <typename T>
ATTRSPACE_HD T tolerance(int rows) {
  return Limits<T>::eps * static_cast<T>(rows);
}

// Round-robin ("circle") ordering: in each of the `even - 1` rounds every column index takes part
// in exactly one of the `even / 2` pairs, so the rotations of one round touch disjoint columns and
// can run in parallel; over the rounds of a sweep every pair meets once. even = cols rounded up to
// even; a pair with j == cols (the padding index of an odd cols) is skipped.
ATTRSPACE_HD void round_robin_pair(int round, int slot, int even, int* i, int* j) {
  int p, q;
  if (slot == 0) {
    p = even - 1;
    q = round;
  } else {
    p = (round + slot) % (even - 1);
    q = (round - slot + even - 1) % (even - 1);
  }
  *i = p < q ? p : q;
  *j = p < q ? q : p;
}

// The rotation [c s; -s c] that diagonalises [[alpha, gamma], [gamma, beta]] (alpha = |a_i|^2,
// beta = |a_j|^2, gamma = a_i . a_j); false when the pair is already orthogonal to `tol` (also for
// a zero column, or a NaN that the caller reports through the singular values). After the rotation
// the squared norms are alpha - t gamma and beta + t gamma, so callers keep them without new dot
// products.
template <typename T>
ATTRSPACE_HD bool rotation(T alpha, T beta, T gamma, T tol, T* c, T* s, T* t) {
  if (!(abs_(gamma) > tol * sqrt_(alpha) * sqrt_(beta))) return false;
  const T zeta = (beta - alpha) / (T(2) * gamma);
  const T size = abs_(zeta);
  // t = sign(zeta) / (|zeta| + sqrt(1 + zeta^2)), the smaller root of t^2 + 2 zeta t - 1 = 0. Past
  // 1/sqrt(eps), sqrt(1 + zeta^2) rounds to |zeta| (and zeta^2 could overflow): t = 1 / (2 zeta).
  T tan = size > Limits<T>::inv_sqrt_eps ? T(1) / (T(2) * size)
                                         : T(1) / (size + sqrt_(T(1) + size * size));
  if (zeta < T(0)) tan = -tan;
  *t = tan;
  *c = T(1) / sqrt_(T(1) + tan * tan);  // |t| <= 1
  *s = *c * tan;
  return true;
}

template <typename T>
ATTRSPACE_HD void rotate_pair(T* x, T* y, int n, int first, int step, T c, T s) {
  for (int k = first; k < n; k += step) {
    const T xk = x[k];
    const T yk = y[k];
    x[k] = c * xk - s * yk;
    y[k] = s * xk + c * yk;
  }
}

template <typename T>
ATTRSPACE_HD T dot(const T* x, const T* y, int n, int first, int step) {
  T acc = T(0);
  for (int k = first; k < n; k += step) acc += x[k] * y[k];
  return acc;
}

// order[k] = index of the k-th largest of s[0..n); a stable selection sort (n <= kJacobiMaxCols).
template <typename T>
ATTRSPACE_HD void sort_descending(const T* s, int n, int* order) {
  for (int k = 0; k < n; ++k) order[k] = k;
  for (int k = 0; k < n; ++k) {
    int best = k;
    for (int r = k + 1; r < n; ++r) {
      if (s[order[r]] > s[order[best]]) best = r;
    }
    const int keep = order[best];
    for (int r = best; r > k; --r) order[r] = order[r - 1];
    order[k] = keep;
  }
}

// Columns first..cols-1 of u (rows x cols, column-major) are zero (singular value negligible):
// replace each by the unit vector e_r with the largest component outside the span of the columns
// before it, orthogonalised twice (classical Gram-Schmidt twice is orthogonal to working
// precision).
template <typename T>
ATTRSPACE_HD void complete_orthonormal(T* u, int rows, int cols, int first) {
  for (int k = first; k < cols; ++k) {
    T* w = u + static_cast<int64_t>(k) * rows;
    int best = 0;
    T best_norm = T(-1);
    for (int r = 0; r < rows; ++r) {
      T outside = T(1);
      for (int j = 0; j < k; ++j) {
        const T ujr = u[static_cast<int64_t>(j) * rows + r];
        outside -= ujr * ujr;
      }
      if (outside > best_norm) {
        best_norm = outside;
        best = r;
      }
    }
    for (int r = 0; r < rows; ++r) w[r] = r == best ? T(1) : T(0);
    for (int pass = 0; pass < 2; ++pass) {
      for (int j = 0; j < k; ++j) {
        const T* uj = u + static_cast<int64_t>(j) * rows;
        const T proj = dot(uj, w, rows, 0, 1);
        for (int r = 0; r < rows; ++r) w[r] -= proj * uj[r];
      }
    }
    const T norm = sqrt_(dot(w, w, rows, 0, 1));
    for (int r = 0; r < rows; ++r) w[r] /= norm;
  }
}

// Column k of the result: s_out = norm[src], u_out = a_src / norm[src] (zero when negligible,
// completed afterwards by complete_orthonormal), v_out = v_src. Elements first, first + step, ...
// of the column.
template <typename T>
ATTRSPACE_HD void write_column(const T* a, const T* v, const T* norm, int src, int k, int rows,
                               int cols, T* u_out, T* v_out, int first, int step) {
  const T sigma = norm[src];
  const T inv = sigma > Limits<T>::negligible ? T(1) / sigma : T(0);
  for (int r = first; r < rows; r += step) {
    u_out[static_cast<int64_t>(k) * rows + r] = a[static_cast<int64_t>(src) * rows + r] * inv;
  }
  for (int r = first; r < cols; r += step) {
    v_out[static_cast<int64_t>(k) * cols + r] = v[static_cast<int64_t>(src) * cols + r];
  }
}

// Number of leading singular values (descending) above the negligible level.
template <typename T>
ATTRSPACE_HD int resolved_count(const T* s_sorted, int cols) {
  int k = 0;
  while (k < cols && s_sorted[k] > Limits<T>::negligible) ++k;
  return k;
}

}  // namespace jacobi
}  // namespace attrspace
