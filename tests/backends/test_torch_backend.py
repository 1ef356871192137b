"""The torch backend's low-precision paths (one GEMM over the concatenated inner dimension, used on
GPUs, and fp32 GEMMs, used on CPUs), both run here on CPU tensors against float64 on fresh random
inputs: forward, dx, g, with and without bias and input gradient, and small updates kept."""

import pytest
import torch

from attrspace.adapters import reference
from attrspace.backends import torch_backend as tb
from attrspace.testing import assert_close, layer_inputs

LOW = [torch.bfloat16, torch.float16]
PATHS = {
    "concat": (tb.forward_concat, tb.backward_concat),
    "upcast": (reference.forward, reference.backward),
    "dispatched": (tb.forward, tb.backward),
}


def test_cpu_tensors_take_the_upcast_path():
    t = {k: v.to(torch.bfloat16) for k, v in layer_inputs(9, 8, 6, 2, seed=3).items()}
    P, Q = t["U"].float() @ t["M"].float(), t["V"].float() @ t["M"].float().t()
    for a, b in zip(
        tb.forward(t["x"], t["weight"], t["bias"], t["V"], P),
        reference.forward(t["x"], t["weight"], t["bias"], t["V"], P),
        strict=True,
    ):
        assert torch.equal(a, b)
    dy = torch.randn(9, 6).to(torch.bfloat16)
    assert torch.equal(
        tb.backward(dy, t["weight"], t["U"], Q, True)[0],
        reference.backward(dy, t["weight"], t["U"], Q, True)[0],
    )


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(33, 40, 24, 8), (5, 16, 72, 3)], ids=["33x40x24", "5x16x72"])
def test_low_precision_paths_match_float64(path, dtype, bias, shape):
    forward, backward = PATHS[path]
    T, d_in, d_out, K = shape
    t = layer_inputs(T, d_in, d_out, K, seed=sum(shape) + bias)
    low = {k: v.to(dtype) for k, v in t.items() if k != "M"}
    P = 0.7 * t["U"] @ t["M"]
    Q = 0.7 * t["V"] @ t["M"].t()
    b = low["bias"] if bias else None
    y, z = forward(low["x"], low["weight"], b, low["V"], P)
    assert y.dtype == z.dtype == dtype
    x64, w64, V64, U64 = (low[k].double() for k in ("x", "weight", "V", "U"))
    y64 = x64 @ w64.t() + (x64 @ V64) @ P.double().t()
    if bias:
        y64 = y64 + low["bias"].double()
    assert_close(y, y64, dtype, "y")
    assert_close(z, x64 @ V64, dtype, "z")
    dy = torch.randn(T, d_out).to(dtype)
    dx, g = backward(dy, low["weight"], low["U"], Q, True)
    assert dx.dtype == dtype and g.dtype == torch.float32
    g64 = dy.double() @ U64
    assert_close(g, g64, dtype, "g")
    assert_close(dx, dy.double() @ w64 + g64 @ Q.double().t(), dtype, "dx")
    none, g_only = backward(dy, low["weight"], low["U"], Q, False)
    assert none is None
    torch.testing.assert_close(g_only, g, rtol=0, atol=0)


SMALL = [(torch.bfloat16, 1e-3), (torch.float16, 1e-4)]


@pytest.mark.parametrize("path", ["concat", "upcast"])
@pytest.mark.parametrize(("dtype", "ratio"), SMALL)
def test_small_output_update_survives(path, dtype, ratio):
    """The forward's adapter term z P^T, about `ratio` of x W^T, is added before the one rounding."""
    T, d_in, d_out, K = 256, 128, 96, 16
    t = layer_inputs(T, d_in, d_out, K, dtype=torch.float64, seed=7)
    x, W, V = t["x"].to(dtype), t["weight"].to(dtype), t["V"].to(dtype)
    base = x.double() @ W.double().t()
    unit = (x.double() @ V.double()) @ (t["U"] @ t["M"].double()).t()
    P = (ratio * float(base.norm() / unit.norm())) * (t["U"] @ t["M"].double())
    y, _ = PATHS[path][0](x, W, None, V, P.float())
    delta = (x.double() @ V.double()) @ P.t()
    fraction = float(((y.double() - base) * delta).sum() / delta.square().sum())
    assert 0.9 <= fraction <= 1.1, fraction


@pytest.mark.parametrize("path", ["concat", "upcast"])
@pytest.mark.parametrize(("dtype", "ratio"), SMALL)
def test_small_input_gradient_update_survives(path, dtype, ratio):
    """The backward's adapter term g Q^T, about `ratio` of dy W, is added before the one rounding."""
    T, d_in, d_out, K = 256, 96, 128, 16
    t = layer_inputs(T, d_in, d_out, K, dtype=torch.float64, seed=5)
    dy = torch.randn(T, d_out, dtype=torch.float64).to(dtype)
    W, U = t["weight"].to(dtype), t["U"].to(dtype)
    base = dy.double() @ W.double()
    unit = (dy.double() @ U.double()) @ (t["V"] @ t["M"].double().t()).t()
    Q = (ratio * float(base.norm() / unit.norm())) * (t["V"] @ t["M"].double().t())
    dx, _ = PATHS[path][1](dy, W, U, Q.float(), True)
    delta = (dy.double() @ U.double()) @ Q.t()
    fraction = float(((dx.double() - base) * delta).sum() / delta.square().sum())
    assert 0.9 <= fraction <= 1.1, fraction
