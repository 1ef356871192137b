"""The Triton kernels of the adapted layer against attrspace.reference.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
the shapes stay small: a few programs of 32 x 32 blocks each. Outputs are written into NaN-filled
buffers, so an element a kernel fails to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from attrspace.kernels.subspace_linear import subspace_linear_backward, subspace_linear_forward

from attrspace import dispatch, reference
from attrspace.functional import subspace_linear

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NO_BF16 = "the Triton interpreter cannot compute in bfloat16; bfloat16 runs only on a GPU"

SHAPES = [  # (T, d_in, d_out, K)
    pytest.param(64, 64, 96, 16, id="regular"),
    pytest.param(37, 100, 72, 24, id="ragged"),  # no dimension a multiple of a block, K not 2^n
    pytest.param(70, 48, 40, 8, id="two-row-groups"),  # 3 row blocks: a full and a partial group
    pytest.param(1, 40, 24, 5, id="one-token"),
    pytest.param(20, 32, 16, 128, id="max-rank"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(not CUDA, reason=NO_BF16)),
]
# fp32 kernels against a float64 reference, relative to the largest reference element.
FP32_TOLERANCE = 1e-5


def _nan(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def _layer(d_in: int, d_out: int, K: int, dtype: torch.dtype, seed: int):
    """Weight, bias, U, V of unit-scale outputs, so the base and adapter terms are of similar size."""
    torch.manual_seed(seed)
    weight = _randn(d_out, d_in, dtype=dtype, scale=d_in**-0.5)
    bias = _randn(d_out, dtype=dtype)
    U = _randn(d_out, K, dtype=dtype, scale=d_out**-0.5)
    V = _randn(d_in, K, dtype=dtype, scale=d_in**-0.5)
    return weight, bias, U, V


def _error(actual: torch.Tensor, expected64: torch.Tensor) -> float:
    assert actual.shape == expected64.shape
    assert torch.isfinite(actual).all(), "unwritten (NaN) or non-finite elements"
    return (actual.double() - expected64).abs().max().item()


def _check(actual: torch.Tensor, expected64: torch.Tensor, plain_torch: torch.Tensor, what: str):
    """fp32: within FP32_TOLERANCE. fp16 / bf16: the flash-attention rule, an error against float64
    at most twice that of the same formula computed by plain torch in the low dtype."""
    error = _error(actual, expected64)
    if actual.dtype == torch.float32:
        bound = FP32_TOLERANCE * expected64.abs().max().item()
        assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"
    else:
        torch_error = _error(plain_torch, expected64)
        assert error <= 2 * torch_error, (
            f"{what}: max error {error:.3g} > 2 x plain torch {actual.dtype} ({torch_error:.3g})"
        )


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, d_in, d_out, K", SHAPES)
def test_forward_matches_reference(T, d_in, d_out, K, dtype, with_bias):
    weight, bias, _, V = _layer(d_in, d_out, K, dtype, seed=T + d_in + K)
    bias = bias if with_bias else None
    x = _randn(T, d_in, dtype=dtype)
    P = _randn(d_out, K, scale=K**-0.5)  # s U M in fp32
    y, z = subspace_linear_forward(
        x, weight, bias, V, P, out=_nan(T, d_out, dtype=dtype), z_out=_nan(T, K, dtype=dtype)
    )
    assert y.dtype == z.dtype == dtype
    b64 = bias.double() if with_bias else None
    y64, z64 = reference.forward(x.double(), weight.double(), b64, V.double(), P.double())
    z_plain = x @ V
    y_plain = x @ weight.t() + z_plain @ P.to(dtype).t()
    y_plain = y_plain + bias if with_bias else y_plain
    _check(z, z64, z_plain, "z")
    _check(y, y64, y_plain, "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, d_in, d_out, K", SHAPES)
def test_backward_matches_reference(T, d_in, d_out, K, dtype):
    weight, _, U, _ = _layer(d_in, d_out, K, dtype, seed=T + d_out + K)
    dy = _randn(T, d_out, dtype=dtype)
    Q = _randn(d_in, K, scale=K**-0.5)  # s V M^T in fp32
    dx, g = subspace_linear_backward(
        dy,
        weight,
        U,
        Q,
        True,
        dx_out=_nan(T, d_in, dtype=dtype),
        g_out=_nan(T, K, dtype=torch.float32),
    )
    assert dx.dtype == dtype and g.dtype == torch.float32
    dx64, g64 = reference.backward(dy.double(), weight.double(), U.double(), Q.double(), True)
    # g is fp32 in every dtype: products of the inputs summed in fp32.
    g_error = _error(g, g64)
    assert g_error <= FP32_TOLERANCE * g64.abs().max().item(), f"g: max error {g_error:.3g}"
    dx_plain = dy @ weight + (dy @ U) @ Q.to(dtype).t()
    _check(dx, dx64, dx_plain, "dx")


@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_backward_without_dx_computes_g_only(dtype):
    T, d_in, d_out, K = 37, 100, 72, 24
    weight, _, U, _ = _layer(d_in, d_out, K, dtype, seed=1)
    dy = _randn(T, d_out, dtype=dtype)
    Q = _randn(d_in, K)
    dx, g = subspace_linear_backward(dy, weight, U, Q, False, g_out=_nan(T, K, dtype=torch.float32))
    assert dx is None
    _, g64 = reference.backward(dy.double(), weight.double(), U.double(), Q.double(), False)
    assert _error(g, g64) <= FP32_TOLERANCE * g64.abs().max().item()


def test_input_dtype_adapter_precision_matches_reference():
    """The bf16 default (the adapter term's operands rounded to the input dtype), run in fp16 so that the
    interpreter covers it: still within the flash-attention rule of a plain fp16 computation."""
    T, d_in, d_out, K = 37, 100, 72, 24
    dtype = torch.float16
    weight, bias, U, V = _layer(d_in, d_out, K, dtype, seed=2)
    x = _randn(T, d_in, dtype=dtype)
    P = _randn(d_out, K, scale=K**-0.5)
    y, _ = subspace_linear_forward(
        x, weight, bias, V, P, out=_nan(T, d_out, dtype=dtype), adapter_precision="input"
    )
    y64, _ = reference.forward(x.double(), weight.double(), bias.double(), V.double(), P.double())
    _check(y, y64, x @ weight.t() + bias + (x @ V) @ P.to(dtype).t(), "y")
    dy = _randn(T, d_out, dtype=dtype)
    Q = _randn(d_in, K, scale=K**-0.5)
    dx, _ = subspace_linear_backward(
        dy, weight, U, Q, True, dx_out=_nan(T, d_in, dtype=dtype), adapter_precision="input"
    )
    dx64, _ = reference.backward(dy.double(), weight.double(), U.double(), Q.double(), True)
    _check(dx, dx64, dy @ weight + (dy @ U) @ Q.to(dtype).t(), "dx")


def test_zero_tokens_give_empty_outputs():
    weight, bias, U, V = _layer(40, 24, 8, torch.float32, seed=3)
    y, z = subspace_linear_forward(_randn(0, 40), weight, bias, V, _randn(24, 8))
    assert y.shape == (0, 24) and z.shape == (0, 8)
    dx, g = subspace_linear_backward(_randn(0, 24), weight, U, _randn(40, 8), True)
    assert dx.shape == (0, 40) and g.shape == (0, 8)


def test_bad_inputs_raise_naming_the_argument():
    weight, bias, U, V = _layer(40, 24, 8, torch.float32, seed=4)
    x, P = _randn(5, 40), _randn(24, 8)
    with pytest.raises(ValueError, match="V must have shape"):
        subspace_linear_forward(x, weight, bias, V[:-1], P)
    with pytest.raises(TypeError, match=r"P must be torch\.float32"):
        subspace_linear_forward(x, weight, bias, V, P.half())
    with pytest.raises(ValueError, match="rank K"):
        subspace_linear_forward(x, weight, bias, _randn(40, 129), _randn(24, 129))
    with pytest.raises(ValueError, match="out must have shape"):
        subspace_linear_forward(x, weight, bias, V, P, out=_nan(5, 23, dtype=torch.float32))
    with pytest.raises(ValueError, match="adapter_precision"):
        subspace_linear_forward(x, weight, bias, V, P, adapter_precision="input")
    with pytest.raises(TypeError, match="dy must be"):
        subspace_linear_backward(_randn(5, 24).double(), weight, U, _randn(40, 8))


def test_backend_reports_what_it_cannot_run():
    impl = dispatch.implementation("triton")
    assert impl.unavailable_reason() is None
    weight = _randn(24, 40)
    assert impl.unsupported_reasons(_randn(5, 40), weight, 8) == []
    assert any("float64" in r for r in impl.unsupported_reasons(_randn(5, 40).double(), weight, 8))
    assert any("K=200" in r for r in impl.unsupported_reasons(_randn(5, 40), weight, 200))
    if not CUDA:
        reasons = impl.unsupported_reasons(_randn(5, 40, dtype=torch.bfloat16), weight, 8)
        assert any("bfloat16" in r for r in reasons)


def test_subspace_linear_on_triton_matches_torch_backend():
    """Forward and every gradient through the autograd Function, leading batch dims included."""
    d_in, d_out, K, scale = 48, 40, 12, 0.5
    weight, bias, U, V = _layer(d_in, d_out, K, torch.float32, seed=5)
    M = _randn(K, K)
    x = _randn(2, 19, d_in)
    results = {}
    for backend in ("triton", "torch"):
        xb, Mb = x.clone().requires_grad_(True), M.clone().requires_grad_(True)
        y, name = subspace_linear(xb, weight, bias, U, V, Mb, scale, backend=backend)
        assert name == backend
        (y * torch.linspace(-1, 1, d_out, device=DEVICE)).sum().backward()
        results[backend] = (y, xb.grad, Mb.grad)
    for ours, truth, what in zip(
        results["triton"], results["torch"], ("y", "dx", "dM"), strict=True
    ):
        bound = FP32_TOLERANCE * truth.abs().max().item()
        assert (ours - truth).abs().max().item() <= bound, what


@pytest.mark.skipif(not CUDA, reason=NO_BF16)
def test_small_bf16_update_survives_rounding():
    """An adapter term about 1e-3 of the output is added before the one rounding, so in bf16 its effect
    on y is kept on average (added to an already-rounded output, most of it would be rounded away)."""
    T, d_in, d_out, K = 4096, 256, 256, 16
    dtype = torch.bfloat16
    weight, bias, _, V = _layer(d_in, d_out, K, dtype, seed=6)
    x = _randn(T, d_in, dtype=dtype)
    P = torch.full((d_out, K), 1e-3 * K**-0.5, device=DEVICE)
    y, z = subspace_linear_forward(x, weight, bias, V, P)
    y0, _ = subspace_linear_forward(x, weight, bias, V, torch.zeros_like(P))
    expected = z.float() @ P.t()
    # The share of the update found in y: the projection of y - y0 on the update.
    fraction = (((y.float() - y0.float()) * expected).sum() / expected.square().sum()).item()
    assert 0.9 <= fraction <= 1.1, f"kept fraction of the update {fraction:.3f}"
