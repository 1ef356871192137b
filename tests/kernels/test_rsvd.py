"""The Triton kernels of the randomized SVD (kernels/rsvd.py) against torch, on small shapes.

Without a GPU they run in the Triton interpreter, which must be switched on before attrspace.kernels is
imported (tests/conftest.py does the same). Tolerances: 1e-5 (float32) and 1e-12 (float64) relative to
the operands' scale, as for the other fp32 kernels (docs/design.md §5).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed")

from attrspace.kernels import rsvd  # noqa: E402
from attrspace.linalg import principal_cosines  # noqa: E402
from attrspace.linalg.randomized import randomized_svd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float64)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _randn(*shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_matmul_matches_torch(dtype):
    # Ragged sizes (no multiple of a block), a strided view, and the transposed operand.
    a = _randn(3, 45, 37, dtype=dtype, seed=0)
    x = _randn(3, 37, 20, dtype=dtype, seed=1)[:, :, ::2]
    out = rsvd.batched_matmul(a, x)
    assert out.shape == (3, 45, 10)
    assert (out - a @ x).abs().max() <= TOL[dtype] * 40
    y = _randn(3, 45, 9, dtype=dtype, seed=2)
    out_t = rsvd.batched_matmul(a, y, transpose_a=True)
    assert out_t.shape == (3, 37, 9)
    assert (out_t - a.mT @ y).abs().max() <= TOL[dtype] * 40
    with pytest.raises(ValueError, match="shapes do not chain"):
        rsvd.batched_matmul(a, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("passes", [1, 3])
def test_cholesky_qr_gives_an_orthonormal_basis_of_the_same_span(dtype, passes):
    # Columns with norms from 1 to 1e-3: cond(Y) ~ 1e3, where one unshifted pass would lose digits.
    y = _randn(2, 70, 12, dtype=dtype, seed=3) * torch.logspace(
        0, -3, 12, dtype=dtype, device=DEVICE
    )
    before = y.clone()
    q = rsvd.cholesky_qr(y, passes)
    assert torch.equal(y, before), "the input must not be modified"
    householder = torch.linalg.qr(y.double()).Q
    assert principal_cosines(q.double(), householder, orthonormal=False).min() > 1 - 1e-6
    eye = torch.eye(12, dtype=torch.float64, device=DEVICE)
    gap = (q.double().mT @ q.double() - eye).abs().max()
    if passes == 3:
        assert gap < 20 * TOL[dtype]
    else:
        # One shifted pass: not yet orthonormal, but conditioned well enough (cond <= eps^-1/2) for the
        # next pass to finish the job.
        assert torch.linalg.cond(q.double()).max() < torch.finfo(dtype).eps ** -0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_cholesky_qr_falls_back_on_dependent_columns(dtype):
    y = _randn(3, 40, 10, dtype=dtype, seed=4)
    y[1, :, 5] = y[1, :, 2]  # exactly dependent columns
    y[2] = 0.0  # nothing to orthonormalise
    q = rsvd.cholesky_qr(y, 3)
    eye = torch.eye(10, dtype=dtype, device=DEVICE)
    assert torch.isfinite(q).all()
    assert (q.mT @ q - eye).abs().max() < 20 * TOL[dtype]
    # The span of y[1] is kept: y = Q Q^T y.
    assert (q[1] @ (q[1].mT @ y[1]) - y[1]).abs().max() < 100 * TOL[dtype]
    with pytest.raises(ValueError, match="passes must be"):
        rsvd.cholesky_qr(y, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_randomized_svd_triton_backend_matches_torch_reference(dtype):
    gen = torch.Generator().manual_seed(11)
    sv = torch.tensor([10.0 ** (-0.5 * i) for i in range(10)], dtype=torch.float64)

    def factor(m, n):
        u = torch.linalg.qr(torch.randn(m, 10, generator=gen, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(n, 10, generator=gen, dtype=torch.float64)).Q
        return (u * sv).to(dtype).to(DEVICE), v.to(dtype).to(DEVICE)

    p, q = factor(36, 20)
    ops = [(p, q), factor(36, 20), factor(20, 33), (p @ q.T)]
    ref = randomized_svd(
        ops, 4, oversample=4, backend="torch", generator=torch.Generator().manual_seed(2)
    )
    got = randomized_svd(
        ops, 4, oversample=4, backend="triton", generator=torch.Generator().manual_seed(2)
    )
    for op, (u0, s0, v0), (u1, s1, v1) in zip(ops, ref, got, strict=True):
        assert (s1 - s0).abs().max() <= TOL[dtype] * s0[0]
        dense = op if isinstance(op, torch.Tensor) else op[0] @ op[1].T
        exact = torch.linalg.svdvals(dense.double())[:4]
        assert (s1.double() - exact).abs().max() <= TOL[dtype] * exact[0]
        assert principal_cosines(u1.double(), u0.double()).min() > 1 - 1e-5
        assert principal_cosines(v1.double(), v0.double()).min() > 1 - 1e-5
