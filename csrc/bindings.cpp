// attrspace._C: thin pybind11 bindings. Arguments are integers (device addresses, sizes, a dtype code,
// a stream handle), so the module links neither libtorch nor a particular torch ABI.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "attrspace.h"
#include "jacobi_svd.h"

namespace py = pybind11;

namespace {

#ifdef ATTRSPACE_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
constexpr const char* kCudaArchs = ATTRSPACE_CUDA_ARCHS;
#else
constexpr bool kBuiltWithCuda = false;
constexpr const char* kCudaArchs = "";
#endif

attrspace::DType to_dtype(int32_t code) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                std::to_string(code));
  }
  return static_cast<attrspace::DType>(code);
}

void check_sizes(int64_t tokens, int64_t d_in, int64_t d_out, int64_t rank) {
  if (tokens < 0 || d_in <= 0 || d_out <= 0 || rank <= 0 || rank > attrspace::kMaxRank) {
    throw std::invalid_argument("sizes must satisfy tokens >= 0, d_in > 0, d_out > 0, 0 < K <= " +
                                std::to_string(attrspace::kMaxRank));
  }
}

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "attrspace native kernels (raw pointers, sizes and streams; no libtorch)";

  m.def("build_info", [] {
    py::dict info;
    info["built_with_cuda"] = kBuiltWithCuda;
    info["cuda_archs"] = std::string(kCudaArchs);
    info["max_rank"] = attrspace::kMaxRank;
    info["cuda_request"] = std::string(ATTRSPACE_CUDA_REQUEST);
    info["cuda_compiler"] = std::string(ATTRSPACE_CUDA_COMPILER);
    return info;
  });

  m.def("schedule_ints", &attrspace::schedule_ints, py::arg("tokens"), py::arg("n"),
        "int32 schedule elements of a launch over `tokens` rows and `n` output columns");
  m.def("grad_part_floats", &attrspace::grad_part_floats, py::arg("tokens"), py::arg("rank"),
        "fp32 scratch elements of the backward's dM reduction");

  // One launch per pass. The schedule must be all zero; the launch leaves it zero. With u (forward)
  // or v (backward) non-zero, p / q is scratch that the launch fills with scale U M / scale V M^T
  // first; with dm non-zero the backward also writes dM = scale g^T z (part: its scratch).
  m.def(
      "subspace_forward",
      [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t v, std::uintptr_t p,
         std::uintptr_t y, std::uintptr_t z, std::uintptr_t z_fp32, std::uintptr_t schedule,
         int64_t tokens, int64_t d_in, int64_t d_out, int64_t rank, int32_t dtype,
         std::uintptr_t stream, std::uintptr_t u, std::uintptr_t m_core, float scale) {
        check_sizes(tokens, d_in, d_out, rank);
        attrspace::SubspaceForwardParams params{as_ptr<const void>(x),    as_ptr<const void>(w),
                                                as_ptr<const void>(bias), as_ptr<const void>(v),
                                                as_ptr<float>(p),         as_ptr<void>(y),
                                                as_ptr<void>(z),          as_ptr<float>(z_fp32),
                                                as_ptr<int32_t>(schedule), tokens, d_in, d_out, rank,
                                                to_dtype(dtype)};
        params.u = as_ptr<const void>(u);
        params.m = as_ptr<const float>(m_core);
        params.scale = scale;
        py::gil_scoped_release release;
        attrspace::subspace_forward_cuda(params, stream);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("v"), py::arg("p"), py::arg("y"),
      py::arg("z"), py::arg("z_fp32"), py::arg("schedule"), py::arg("tokens"), py::arg("d_in"),
      py::arg("d_out"), py::arg("rank"), py::arg("dtype"), py::arg("stream"), py::arg("u") = 0,
      py::arg("m") = 0, py::arg("scale") = 1.0f);

  m.def(
      "subspace_backward",
      [](std::uintptr_t dy, std::uintptr_t w, std::uintptr_t u, std::uintptr_t q, std::uintptr_t dx,
         std::uintptr_t g, std::uintptr_t schedule, int64_t tokens, int64_t d_in, int64_t d_out,
         int64_t rank, int32_t dtype, std::uintptr_t stream, std::uintptr_t v,
         std::uintptr_t m_core, std::uintptr_t z, std::uintptr_t dm, std::uintptr_t part,
         float scale) {
        check_sizes(tokens, d_in, d_out, rank);
        attrspace::SubspaceBackwardParams params{as_ptr<const void>(dy), as_ptr<const void>(w),
                                                 as_ptr<const void>(u),  as_ptr<float>(q),
                                                 as_ptr<void>(dx),       as_ptr<float>(g),
                                                 as_ptr<int32_t>(schedule), tokens, d_in, d_out,
                                                 rank, to_dtype(dtype)};
        params.v = as_ptr<const void>(v);
        params.m = as_ptr<const float>(m_core);
        params.z = as_ptr<const void>(z);
        params.dm = as_ptr<float>(dm);
        params.part = as_ptr<float>(part);
        params.scale = scale;
        py::gil_scoped_release release;
        attrspace::subspace_backward_cuda(params, stream);
      },
      py::arg("dy"), py::arg("w"), py::arg("u"), py::arg("q"), py::arg("dx"), py::arg("g"),
      py::arg("schedule"), py::arg("tokens"), py::arg("d_in"), py::arg("d_out"), py::arg("rank"),
      py::arg("dtype"), py::arg("stream"), py::arg("v") = 0, py::arg("m") = 0, py::arg("z") = 0,
      py::arg("dm") = 0, py::arg("part") = 0, py::arg("scale") = 1.0f);

  attrspace::register_svd(m);
}
