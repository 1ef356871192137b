// The exact adapted layer as one C++ autograd node, for bench/host_floor.py only (not part of the
// package: attrspace._C includes no Torch headers, so that one build serves every torch version).
// It saves what attrspace's layer saves (z = x V and the frozen tensors, never x) and runs the
// fewest ATen calls the exact layer needs: 4 forward, 5 backward.
#include <torch/extension.h>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ExactLayer : public torch::autograd::Function<ExactLayer> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const c10::optional<at::Tensor>& b, const at::Tensor& u,
                            const at::Tensor& v, const at::Tensor& m, double s) {
    at::Tensor z = at::mm(x, v);
    at::Tensor y = b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
    y.addmm_(at::mm(z, m.t()), u.t(), 1, s);
    ctx->save_for_backward({z, w, u, v, m});
    ctx->saved_data["s"] = s;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &z = saved[0], &w = saved[1], &u = saved[2], &v = saved[3], &m = saved[4];
    const double s = ctx->saved_data["s"].toDouble();
    const at::Tensor g = at::mm(grads[0], u);
    at::Tensor dx, dm;
    if (ctx->needs_input_grad(0)) dx = at::mm(grads[0], w).addmm_(at::mm(g, m), v.t(), 1, s);
    if (ctx->needs_input_grad(5)) dm = at::mm(g.t(), z).mul_(s);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), dm, at::Tensor()};
  }
};

at::Tensor exact_layer(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       const at::Tensor& u, const at::Tensor& v, const at::Tensor& m, double s) {
  return ExactLayer::apply(x, w, b, u, v, m, s);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) { module.def("exact_layer", &exact_layer); }
