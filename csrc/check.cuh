// Host-side helpers of the CUDA launchers: error checks naming the failing call, dtype selection.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "attrspace.h"

// Throws std::runtime_error (a RuntimeError in Python) naming the call, file and line.
#define CUDA_CHECK(call)                                                             \
  do {                                                                               \
    const cudaError_t attrspace_err_ = (call);                                       \
    if (attrspace_err_ != cudaSuccess) {                                             \
      throw std::runtime_error(std::string(#call) + " failed at " + __FILE__ + ":" + \
                               std::to_string(__LINE__) + ": " +                     \
                               cudaGetErrorString(attrspace_err_));                  \
    }                                                                                \
  } while (0)

namespace attrspace {

// The entry of {fp32, fp16, bf16} that matches `dtype`.
template <typename T>
T by_dtype(DType dtype, T fp32, T fp16, T bf16) {
  switch (dtype) {
    case DType::kFloat32:
      return fp32;
    case DType::kFloat16:
      return fp16;
    case DType::kBFloat16:
      return bf16;
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

}  // namespace attrspace
