// Launch entry point of the emulated kernels (see emulated_cuda.h), called from Python by ctypes.
#pragma once

#include <cstring>

namespace emu {

using Kernel = void (*)(const void*, const void*, const void*, const void*, float*, void*, float*,
                        void*, int*, const void*, const float*, const void*, float*, float*,
                        long long, long long, long long, long long, float);

inline Kernel find_kernel(const char* name) {
  using namespace attrspace_kernels;
  const struct {
    const char* name;
    Kernel kernel;
  } table[] = {
      {"attrspace_forward_f32", attrspace_forward_f32},
      {"attrspace_forward_f16", attrspace_forward_f16},
      {"attrspace_forward_bf16", attrspace_forward_bf16},
      {"attrspace_backward_f32", attrspace_backward_f32},
      {"attrspace_backward_f16", attrspace_backward_f16},
      {"attrspace_backward_bf16", attrspace_backward_bf16},
  };
  for (const auto& entry : table) {
    if (std::strcmp(entry.name, name) == 0) return entry.kernel;
  }
  return nullptr;
}

}  // namespace emu

// Runs `blocks` blocks of kernel `name` one after another, as a launch whose blocks take their
// tickets in launch order; pointers: the 14 addresses, sizes: m, n, kd, rank, then the scale (as the
// entry points take them). Returns 0, or -1 for an unknown name.
extern "C" int emu_launch(const char* name, int blocks, const unsigned long long* pointers,
                          const long long* sizes, float scale) {
  const emu::Kernel kernel = emu::find_kernel(name);
  if (kernel == nullptr) return -1;
  const auto* p = pointers;
  emu::Block block(attrspace_kernels::kThreads);
  emu::grid_dim.x = static_cast<unsigned>(blocks);
  for (int b = 0; b < blocks; ++b) {
    block.run([=] {
      kernel(reinterpret_cast<const void*>(p[0]), reinterpret_cast<const void*>(p[1]),
             reinterpret_cast<const void*>(p[2]), reinterpret_cast<const void*>(p[3]),
             reinterpret_cast<float*>(p[4]), reinterpret_cast<void*>(p[5]),
             reinterpret_cast<float*>(p[6]), reinterpret_cast<void*>(p[7]),
             reinterpret_cast<int*>(p[8]), reinterpret_cast<const void*>(p[9]),
             reinterpret_cast<const float*>(p[10]), reinterpret_cast<const void*>(p[11]),
             reinterpret_cast<float*>(p[12]), reinterpret_cast<float*>(p[13]), sizes[0],
             sizes[1], sizes[2], sizes[3], scale);
    });
  }
  return 0;
}
