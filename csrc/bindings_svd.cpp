// pybind11 entry points of the batched Jacobi SVD: raw addresses, sizes and a stream, as
// bindings.cpp.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "jacobi_svd.h"

namespace py = pybind11;

namespace attrspace {
namespace {

JacobiSvdParams make_params(std::uintptr_t a, std::uintptr_t u, std::uintptr_t s, std::uintptr_t v,
                            std::uintptr_t info, int64_t batch, int64_t rows, int64_t cols,
                            bool is_double, int64_t max_sweeps) {
  if (batch < 0 || cols < 1 || rows < cols || cols > kJacobiMaxCols ||
      rows * cols > (int64_t{1} << 30)) {
    throw std::invalid_argument(
        "jacobi_svd needs batch >= 0, 1 <= cols <= rows, cols <= " +
        std::to_string(kJacobiMaxCols) + ", got batch=" + std::to_string(batch) +
        ", rows=" + std::to_string(rows) + ", cols=" + std::to_string(cols));
  }
  if (max_sweeps < 1 || max_sweeps > 1000) {
    throw std::invalid_argument("max_sweeps must be in [1, 1000], got " +
                                std::to_string(max_sweeps));
  }
  return JacobiSvdParams{
      reinterpret_cast<void*>(a),      reinterpret_cast<void*>(u),       reinterpret_cast<void*>(s),
      reinterpret_cast<void*>(v),      reinterpret_cast<int32_t*>(info), batch,
      static_cast<int32_t>(rows),      static_cast<int32_t>(cols),       is_double,
      static_cast<int32_t>(max_sweeps)};
}

}  // namespace

void register_svd(py::module_& m) {
  m.def(
      "jacobi_svd_cpu",
      [](std::uintptr_t a, std::uintptr_t u, std::uintptr_t s, std::uintptr_t v,
         std::uintptr_t info, int64_t batch, int64_t rows, int64_t cols, bool is_double,
         int64_t max_sweeps, int threads) {
        const JacobiSvdParams params =
            make_params(a, u, s, v, info, batch, rows, cols, is_double, max_sweeps);
        py::gil_scoped_release release;
        jacobi_svd_cpu(params, threads);
      },
      "Batched one-sided Jacobi SVD of host matrices (see csrc/jacobi_svd.h for the layout)",
      py::arg("a"), py::arg("u"), py::arg("s"), py::arg("v"), py::arg("info"), py::arg("batch"),
      py::arg("rows"), py::arg("cols"), py::arg("is_double"), py::arg("max_sweeps"),
      py::arg("threads"));

  m.def(
      "jacobi_svd_cuda",
      [](std::uintptr_t a, std::uintptr_t u, std::uintptr_t s, std::uintptr_t v,
         std::uintptr_t info, int64_t batch, int64_t rows, int64_t cols, bool is_double,
         int64_t max_sweeps, std::uintptr_t stream) {
        const JacobiSvdParams params =
            make_params(a, u, s, v, info, batch, rows, cols, is_double, max_sweeps);
#ifdef ATTRSPACE_WITH_CUDA
        py::gil_scoped_release release;
        jacobi_svd_cuda(params, stream);
#else
        (void)params;
        (void)stream;
        throw std::runtime_error(
            "attrspace._C was built without CUDA: jacobi_svd_cuda is unavailable");
#endif
      },
      "Batched one-sided Jacobi SVD of device matrices, one thread block per matrix, on `stream`",
      py::arg("a"), py::arg("u"), py::arg("s"), py::arg("v"), py::arg("info"), py::arg("batch"),
      py::arg("rows"), py::arg("cols"), py::arg("is_double"), py::arg("max_sweeps"),
      py::arg("stream"));
}

}  // namespace attrspace
