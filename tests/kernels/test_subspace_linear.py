"""The Triton kernels of the adapted layer against attrspace.adapters.reference.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
the shapes stay small: a few programs of 32 x 32 blocks each. Outputs are written into NaN-filled
buffers, so an element a kernel fails to write fails the comparison. Tolerances: attrspace.testing.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import attrspace
from attrspace import backends
from attrspace.adapters import reference
from attrspace.adapters.functional import subspace_linear
from attrspace.kernels.subspace_linear import subspace_linear_backward, subspace_linear_forward
from attrspace.testing import assert_close, layer_inputs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NO_BF16 = "the Triton interpreter cannot compute in bfloat16; bfloat16 runs only on a GPU"

SHAPES = [  # (T, d_in, d_out, K)
    pytest.param(64, 64, 96, 16, id="regular"),
    pytest.param(37, 100, 72, 24, id="ragged"),  # no dimension a multiple of a block, K not 2^n
    pytest.param(70, 48, 40, 8, id="two-row-groups"),  # 3 row blocks: a full and a partial group
    pytest.param(1, 40, 24, 5, id="one-token"),
    pytest.param(20, 160, 136, 128, id="max-rank"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(not CUDA, reason=NO_BF16)),
]


def _nan(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _layer(
    T: int, d_in: int, d_out: int, K: int, dtype: torch.dtype, seed: int, scale: float = 1.5
):
    """layer_inputs plus the fp32 factors P = s U M (d_out, K) and Q = s V M^T (d_in, K) and a random
    dy (T, d_out). With orthonormal U, V and unit M the adapter term is as large as the base term."""
    t = layer_inputs(T, d_in, d_out, K, dtype=dtype, device=DEVICE, seed=seed)
    t["P"] = scale * t["U"].float() @ t["M"]
    t["Q"] = scale * t["V"].float() @ t["M"].t()
    g = torch.Generator().manual_seed(seed + 1)
    t["dy"] = torch.randn(T, d_out, generator=g).to(device=DEVICE, dtype=dtype)
    return t


def _f64(t: dict, *names: str) -> list[torch.Tensor]:
    return [t[n].double() for n in names]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, d_in, d_out, K", SHAPES)
def test_forward_matches_reference(T, d_in, d_out, K, dtype, with_bias):
    t = _layer(T, d_in, d_out, K, dtype, seed=T + d_in + K)
    x, weight, V, P = t["x"], t["weight"], t["V"], t["P"]
    bias = t["bias"] if with_bias else None
    y, z = subspace_linear_forward(
        x, weight, bias, V, P, out=_nan(T, d_out, dtype=dtype), z_out=_nan(T, K, dtype=dtype)
    )
    assert y.dtype == z.dtype == dtype
    x64, w64, v64, p64 = _f64(t, "x", "weight", "V", "P")
    y64, z64 = reference.forward(x64, w64, bias.double() if with_bias else None, v64, p64)
    # The same formulas in plain torch in `dtype`, the baseline of the flash-attention rule.
    z_plain = x @ V
    y_plain = x @ weight.t() + z_plain @ P.to(dtype).t() + (bias if with_bias else 0)
    assert_close(z, z64, dtype, "z", baseline=z_plain)
    assert_close(y, y64, dtype, "y", baseline=y_plain)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, d_in, d_out, K", SHAPES)
def test_backward_matches_reference(T, d_in, d_out, K, dtype):
    t = _layer(T, d_in, d_out, K, dtype, seed=T + d_out + K)
    dy, weight, U, Q = t["dy"], t["weight"], t["U"], t["Q"]
    dx_out, g_out = _nan(T, d_in, dtype=dtype), _nan(T, K, dtype=torch.float32)
    dx, g = subspace_linear_backward(dy, weight, U, Q, True, dx_out=dx_out, g_out=g_out)
    assert dx.dtype == dtype and g.dtype == torch.float32
    dx64, g64 = reference.backward(*_f64(t, "dy", "weight", "U", "Q"), True)
    # g is fp32 in every dtype: products of the inputs summed in fp32.
    assert_close(g, g64, torch.float32, "g")
    assert_close(dx, dx64, dtype, "dx", baseline=dy @ weight + (dy @ U) @ Q.to(dtype).t())


@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_backward_without_dx_computes_g_only(dtype):
    T, d_in, d_out, K = 37, 100, 72, 24
    t = _layer(T, d_in, d_out, K, dtype, seed=1)
    g_out = _nan(T, K, dtype=torch.float32)
    dx, g = subspace_linear_backward(t["dy"], t["weight"], t["U"], t["Q"], False, g_out=g_out)
    assert dx is None
    _, g64 = reference.backward(*_f64(t, "dy", "weight", "U", "Q"), False)
    assert_close(g, g64, torch.float32, "g")


def test_input_dtype_adapter_precision_matches_reference():
    """The bf16 default (the adapter term's operands rounded to the input dtype), run in fp16 so that
    the interpreter covers it."""
    T, d_in, d_out, K = 37, 100, 72, 24
    dtype = torch.float16
    t = _layer(T, d_in, d_out, K, dtype, seed=2)
    x, weight, bias, U, V, P, Q, dy = (
        t[n] for n in ("x", "weight", "bias", "U", "V", "P", "Q", "dy")
    )
    y, _ = subspace_linear_forward(
        x, weight, bias, V, P, out=_nan(T, d_out, dtype=dtype), adapter_precision="input"
    )
    y64, _ = reference.forward(*_f64(t, "x", "weight", "bias", "V", "P"))
    assert_close(y, y64, dtype, "y", baseline=x @ weight.t() + bias + (x @ V) @ P.to(dtype).t())
    dx, _ = subspace_linear_backward(
        dy, weight, U, Q, True, dx_out=_nan(T, d_in, dtype=dtype), adapter_precision="input"
    )
    dx64, _ = reference.backward(*_f64(t, "dy", "weight", "U", "Q"), True)
    assert_close(dx, dx64, dtype, "dx", baseline=dy @ weight + (dy @ U) @ Q.to(dtype).t())


def test_strided_operands_match_reference():
    """Transposed views of x, the weight, the bases and the factors, and a strided bias."""
    T, d_in, d_out, K = 37, 100, 72, 24
    t = _layer(T, d_in, d_out, K, torch.float32, seed=7)
    strided = {n: t[n].t().contiguous().t() for n in ("x", "weight", "U", "V", "P", "Q", "dy")}
    strided["bias"] = torch.stack([t["bias"], t["bias"]], dim=1)[:, 0]
    assert not any(v.is_contiguous() for v in strided.values())
    s = strided
    y, z = subspace_linear_forward(s["x"], s["weight"], s["bias"], s["V"], s["P"])
    y64, z64 = reference.forward(*_f64(t, "x", "weight", "bias", "V", "P"))
    assert_close(y, y64, torch.float32, "y")
    assert_close(z, z64, torch.float32, "z")
    dx, g = subspace_linear_backward(s["dy"], s["weight"], s["U"], s["Q"], True)
    dx64, g64 = reference.backward(*_f64(t, "dy", "weight", "U", "Q"), True)
    assert_close(dx, dx64, torch.float32, "dx")
    assert_close(g, g64, torch.float32, "g")


def test_zero_tokens_give_empty_outputs():
    t = _layer(0, 40, 24, 8, torch.float32, seed=3)
    y, z = subspace_linear_forward(t["x"], t["weight"], t["bias"], t["V"], t["P"])
    assert y.shape == (0, 24) and z.shape == (0, 8)
    dx, g = subspace_linear_backward(t["dy"], t["weight"], t["U"], t["Q"], True)
    assert dx.shape == (0, 40) and g.shape == (0, 8)


def test_bad_inputs_raise_naming_the_argument():
    t = _layer(5, 40, 24, 8, torch.float32, seed=4)
    x, weight, bias, U, V, P, Q = (t[n] for n in ("x", "weight", "bias", "U", "V", "P", "Q"))
    with pytest.raises(ValueError, match="V must have shape"):
        subspace_linear_forward(x, weight, bias, V[:-1], P)
    with pytest.raises(TypeError, match=r"P must be torch\.float32"):
        subspace_linear_forward(x, weight, bias, V, P.half())
    with pytest.raises(ValueError, match="rank K"):
        wide = torch.zeros(40, 129, device=DEVICE)
        subspace_linear_forward(x, weight, bias, wide, torch.zeros(24, 129, device=DEVICE))
    with pytest.raises(ValueError, match="out must have shape"):
        subspace_linear_forward(x, weight, bias, V, P, out=_nan(5, 23, dtype=torch.float32))
    with pytest.raises(ValueError, match="adapter_precision"):
        subspace_linear_forward(x, weight, bias, V, P, adapter_precision="input")
    with pytest.raises(TypeError, match="dy must be"):
        subspace_linear_backward(t["dy"].double(), weight, U, Q)


def test_backend_reports_what_it_cannot_run():
    impl = backends.implementation("triton")
    assert impl.unavailable_reason() is None
    x, weight = torch.zeros(5, 40, device=DEVICE), torch.zeros(24, 40, device=DEVICE)
    assert impl.unsupported_reasons(x, weight, 8) == []
    assert any("float64" in r for r in impl.unsupported_reasons(x.double(), weight, 8))
    assert any("K=200" in r for r in impl.unsupported_reasons(x, weight, 200))
    if not CUDA:
        reasons = impl.unsupported_reasons(x.bfloat16(), weight, 8)
        assert any("bfloat16" in r for r in reasons)


@pytest.mark.skipif(CUDA, reason="checks the reason given on a machine without a GPU")
def test_backend_without_gpu_or_interpreter_says_why():
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None); from attrspace import backends; "
        "print(backends.unavailable_reason('triton'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "TRITON_INTERPRET=1" in result.stdout


def test_subspace_linear_on_triton_matches_torch_backend():
    """Forward and every gradient through the autograd Function, leading batch dims included."""
    t = _layer(38, 48, 40, 12, torch.float32, seed=5)
    x = t["x"].reshape(2, 19, 48)
    results = {}
    for backend in ("triton", "torch"):
        xb, M = x.clone().requires_grad_(True), t["M"].clone().requires_grad_(True)
        y, name = subspace_linear(xb, t["weight"], t["bias"], t["U"], t["V"], M, 0.5, backend)
        assert name == backend
        (y * torch.linspace(-1, 1, 40, device=DEVICE)).sum().backward()
        results[backend] = (y, xb.grad, M.grad)
    for ours, truth, what in zip(
        results["triton"], results["torch"], ("y", "dx", "dM"), strict=True
    ):
        assert_close(ours, truth.double(), torch.float32, what)


@pytest.mark.skipif(not CUDA, reason=NO_BF16)
def test_small_bf16_update_survives_rounding():
    """An adapter term about 1e-3 of the output is added before the one rounding, so in bf16 its effect
    on y is kept on average (added to an already-rounded output, most of it would be rounded away)."""
    T, d_in, d_out, K = 4096, 256, 256, 16
    t = _layer(T, d_in, d_out, K, torch.bfloat16, seed=6)
    x, weight, bias, V = t["x"], t["weight"], t["bias"], t["V"]
    P = torch.full((d_out, K), 1e-3 * K**-0.5, device=DEVICE)
    y, z = subspace_linear_forward(x, weight, bias, V, P)
    y0, _ = subspace_linear_forward(x, weight, bias, V, torch.zeros_like(P))
    expected = z.float() @ P.t()
    # The share of the update found in y: the projection of y - y0 on the update.
    fraction = (((y.float() - y0.float()) * expected).sum() / expected.square().sum()).item()
    assert 0.9 <= fraction <= 1.1, f"kept fraction of the update {fraction:.3f}"


def test_compiled_layer_on_the_triton_backend_matches_eager():
    """The Triton launchers are custom ops: torch.compile(fullgraph=True) traces through them."""
    t = layer_inputs(24, 40, 32, 8, seed=11, device=DEVICE)
    linear = torch.nn.Linear(40, 32, device=DEVICE)
    with torch.no_grad():
        linear.weight.copy_(t["weight"])
        linear.bias.copy_(t["bias"])
    layer = attrspace.SubspaceLinear.from_linear(linear, t["U"], t["V"], 2.0, backend="triton")
    with torch.no_grad():
        layer.M.copy_(t["M"])
    x = t["x"].clone().requires_grad_()
    eager = layer(x)
    eager.sum().backward()
    dx, dm = x.grad.clone(), layer.M.grad.clone()
    x.grad, layer.M.grad = None, None
    out = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    out.sum().backward()
    assert layer.backend == "triton"  # an explicit backend runs or raises
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(layer.M.grad, dm)


def test_triton_custom_ops_pass_opcheck():
    from attrspace.backends import triton_backend as _triton_backend

    t = layer_inputs(9, 20, 12, 4, seed=12, device=DEVICE)
    P = t["U"] @ t["M"]
    torch.library.opcheck(_triton_backend._forward_op, (t["x"], t["weight"], t["bias"], t["V"], P))
    dy = torch.randn(9, 12, device=DEVICE)
    Q = t["V"] @ t["M"].t()
    for need_dx in (True, False):
        torch.library.opcheck(_triton_backend._backward_op, (dy, t["weight"], t["U"], Q, need_dx))
