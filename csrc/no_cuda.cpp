// Launch symbols for a build without nvcc: each one fails with the reason.
#include <stdexcept>

#include "attrspace.h"

namespace attrspace {

void subspace_forward_cuda(const SubspaceForwardParams&, std::uintptr_t) {
  throw std::runtime_error("attrspace._C was built without CUDA: subspace_forward_cuda is unavailable");
}

void subspace_backward_cuda(const SubspaceBackwardParams&, std::uintptr_t) {
  throw std::runtime_error("attrspace._C was built without CUDA: subspace_backward_cuda is unavailable");
}

}  // namespace attrspace
