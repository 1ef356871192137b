"""attrspace.linalg against torch.linalg.svd on matrices with known spectra, every backend against the
torch reference, the exact factor-form path, principal cosines and Gram-trace norms.

Tolerances (relative to the largest singular value sigma_1 unless said otherwise):
- exact paths and the Jacobi SVD: 1e-5 in float32, 1e-10 in float64 (rounding only);
- randomized SVD, fast decay (a sharp gap after the sketch width): 1e-5 / 1e-10 as well;
- randomized SVD, slow decay sigma_i = 1 / (i + 1): 5e-3 relative to each sigma_i (the power-iteration
  error bound (sigma_{l+1} / sigma_i)^(4q + 2) is 3e-5 for the worst kept value; margin for the Gaussian
  draw);
- subspaces: the cosines of the principal angles between computed and true singular subspaces >= 1 - 1e-4
  (float32) where the spectrum has a gap.
"""

import pytest
import torch

from attrspace.backends import auto_rsvd_backend, rsvd_unavailable_reason, select_rsvd_steps
from attrspace.backends.native import native
from attrspace.linalg import (
    factor_svd,
    factored_sq_distance,
    factored_sq_norm,
    principal_cosines,
)
from attrspace.linalg.randomized import randomized_svd

DTYPES = (torch.float32, torch.float64)
ABS_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen)).Q


def planted(m: int, n: int, sv: list[float], gen: torch.Generator):
    """Factors (P (m, r), Q (n, r)) of C = U diag(sv) V^T in float64, and the true U, V."""
    u, v = _orthonormal(m, len(sv), gen), _orthonormal(n, len(sv), gen)
    return u * torch.tensor(sv, dtype=torch.float64), v, u, v


SPECTRA = {
    "fast": [10.0 ** (-0.5 * i) for i in range(12)],
    "slow": [1.0 / (1 + i) for i in range(25)],
    "rank3": [3.0, 2.0, 1.0],
}
# (m, n, dense?): two factor ops of one shape (a batch of 2), a wide factor op and a dense op.
SHAPES = [(40, 30, False), (40, 30, False), (30, 45, False), (36, 28, True)]


def make_ops(spectrum: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ops, truth = [], []
    for m, n, dense in SHAPES:
        p, q, u, v = planted(m, n, SPECTRA[spectrum], gen)
        ops.append((p @ q.T).to(dtype) if dense else (p.to(dtype), q.to(dtype)))
        truth.append((u, torch.tensor(SPECTRA[spectrum], dtype=torch.float64), v))
    return ops, truth


def dense_of(op) -> torch.Tensor:
    return op if isinstance(op, torch.Tensor) else op[0] @ op[1].T


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spectrum", ["fast", "slow", "rank3"])
def test_randomized_svd_known_spectra(spectrum, dtype):
    rank = 5
    ops, truth = make_ops(spectrum, dtype)
    results = randomized_svd(ops, rank, backend="torch", generator=torch.Generator().manual_seed(1))
    assert len(results) == len(ops)
    for op, (u, s, v), (u_true, _, v_true) in zip(ops, results, truth, strict=True):
        m, n = dense_of(op).shape
        assert u.shape == (m, rank) and s.shape == (rank,) and v.shape == (n, rank)
        assert u.dtype == s.dtype == v.dtype == dtype
        exact = torch.linalg.svdvals(dense_of(op).double())[:rank]
        s = s.double()
        assert bool((s[:-1] >= s[1:]).all()), "singular values must be descending"
        if spectrum == "slow":
            assert torch.allclose(s, exact, rtol=5e-3, atol=0)
        else:
            assert (s - exact).abs().max() <= ABS_TOL[dtype] * exact[0]
        eye = torch.eye(rank, dtype=torch.float64)
        assert (u.double().T @ u.double() - eye).abs().max() < 50 * ABS_TOL[dtype]
        assert (v.double().T @ v.double() - eye).abs().max() < 50 * ABS_TOL[dtype]
        k = 3 if spectrum == "rank3" else rank
        if spectrum != "slow":
            assert principal_cosines(u[:, :k].double(), u_true[:, :k]).min() > 1 - 1e-4
            assert principal_cosines(v[:, :k].double(), v_true[:, :k]).min() > 1 - 1e-4
        if spectrum == "rank3":
            # Exactly rank 3: the remaining values are rounding noise, the vectors still orthonormal,
            # and the three leading triplets reconstruct the operator.
            assert s[3:].max() <= ABS_TOL[dtype] * s[0]
            rebuilt = (u[:, :3] * s[:3].to(dtype)) @ v[:, :3].T
            assert (rebuilt.double() - dense_of(op).double()).abs().max() < 10 * ABS_TOL[dtype]


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_randomized_svd_tiny_and_huge_scales_float32(scale):
    ops, _ = make_ops("fast", torch.float32)
    root = scale**0.5
    scaled = [
        op * scale if isinstance(op, torch.Tensor) else (op[0] * root, op[1] * root) for op in ops
    ]
    gen_seed = 3
    ref = randomized_svd(ops, 4, generator=torch.Generator().manual_seed(gen_seed), backend="torch")
    got = randomized_svd(
        scaled, 4, generator=torch.Generator().manual_seed(gen_seed), backend="torch"
    )
    for (u0, s0, _), (u1, s1, v1) in zip(ref, got, strict=True):
        assert torch.isfinite(s1).all() and torch.isfinite(u1).all() and torch.isfinite(v1).all()
        assert torch.allclose(s1.double() / scale, s0.double(), rtol=1e-5, atol=0)
        assert principal_cosines(u1.double(), u0.double()).min() > 1 - 1e-5


def test_zero_operator_gives_zero_values_and_orthonormal_vectors():
    ops = [torch.zeros(12, 9), (torch.zeros(10, 3), torch.ones(7, 3))]
    for u, s, v in randomized_svd(ops, 3, backend="torch"):
        assert (s == 0).all()
        assert torch.allclose(u.T @ u, torch.eye(3), atol=1e-6)
        assert torch.allclose(v.T @ v, torch.eye(3), atol=1e-6)


def test_generator_makes_runs_reproducible_and_seeds_matter():
    ops, _ = make_ops("slow", torch.float64)
    a = randomized_svd(
        ops, 4, power_iters=0, generator=torch.Generator().manual_seed(7), backend="torch"
    )
    b = randomized_svd(
        ops, 4, power_iters=0, generator=torch.Generator().manual_seed(7), backend="torch"
    )
    c = randomized_svd(
        ops, 4, power_iters=0, generator=torch.Generator().manual_seed(8), backend="torch"
    )
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x[1], y[1]) for x, y in zip(a, c, strict=True))


def test_power_iterations_reduce_the_error_on_a_slow_spectrum():
    ops, _ = make_ops("slow", torch.float64)
    exact = [torch.linalg.svdvals(dense_of(op))[:5] for op in ops]

    def worst(q):
        gen = torch.Generator().manual_seed(0)
        res = randomized_svd(ops, 5, oversample=2, power_iters=q, backend="torch", generator=gen)
        return max(
            float(((s - e) / e).abs().max()) for (_, s, _), e in zip(res, exact, strict=True)
        )

    assert worst(2) < worst(0) / 10


@pytest.mark.parametrize("where", ["dense", "factor P", "factor Q"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_input_names_the_operator(where, bad):
    ops, _ = make_ops("fast", torch.float32)
    ops = [
        op.clone() if isinstance(op, torch.Tensor) else (op[0].clone(), op[1].clone()) for op in ops
    ]
    if where == "dense":
        index, tensor = 3, ops[3]
    else:
        index, tensor = 1, ops[1][0 if where == "factor P" else 1]
    tensor[2, 1] = bad
    label = f"op {index} ({where})" if where != "dense" else "op 3"
    with pytest.raises(
        ValueError, match=f"{label.replace('(', '[(]').replace(')', '[)]')} contains NaN or Inf"
    ):
        randomized_svd(ops, 3, backend="torch")


def test_bad_arguments_raise_clear_errors():
    good = torch.randn(6, 5)
    with pytest.raises(ValueError, match="op 1: rank 6 exceeds min"):
        randomized_svd([torch.randn(9, 9), good], 6)
    with pytest.raises(ValueError, match="op 0: expected a 2-D tensor"):
        randomized_svd([torch.randn(2, 6, 5)], 2)
    with pytest.raises(TypeError, match="op 0: dtype must be float32 or float64"):
        randomized_svd([good.half()], 2)
    with pytest.raises(ValueError, match=r"op 0: P .* and Q .* need the same kr"):
        randomized_svd([(torch.randn(6, 3), torch.randn(5, 4))], 2)
    with pytest.raises(ValueError, match="share dtype and device"):
        randomized_svd([(torch.randn(6, 3), torch.randn(5, 3, dtype=torch.float64))], 2)
    with pytest.raises(TypeError, match="op 0: expected a tensor"):
        randomized_svd([[good]], 2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        randomized_svd([good], 0)
    with pytest.raises(ValueError, match="power_iters must be >= 0"):
        randomized_svd([good], 2, power_iters=-1)
    with pytest.raises(ValueError, match="unknown backend 'cusolver'"):
        randomized_svd([good], 2, backend="cusolver")
    assert randomized_svd([], 3) == []


def _available_backends() -> list[str]:
    cpu = torch.device("cpu")
    return [name for name in ("cuda", "triton") if rsvd_unavailable_reason(name, cpu) is None]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_backend_matches_the_torch_reference(dtype):
    backends = _available_backends()
    assert "cuda" in backends or native() is None, rsvd_unavailable_reason(
        "cuda", torch.device("cpu")
    )
    # The triton backend is exercised (interpreted) in test_rsvd_kernels.py; here the cheap ones.
    ops, _ = make_ops("fast", dtype)
    ref = randomized_svd(ops, 4, backend="torch", generator=torch.Generator().manual_seed(5))
    for backend in [b for b in backends if b != "triton"] + ["auto"]:
        got = randomized_svd(ops, 4, backend=backend, generator=torch.Generator().manual_seed(5))
        for (u0, s0, v0), (u1, s1, v1) in zip(ref, got, strict=True):
            assert (s1 - s0).abs().max() <= ABS_TOL[dtype] * s0[0], backend
            # Same sketch, so the same vectors up to sign.
            assert (u1.abs() - u0.abs()).abs().max() < 100 * ABS_TOL[dtype], backend
            assert (v1.abs() - v0.abs()).abs().max() < 100 * ABS_TOL[dtype], backend


def test_backend_selection_and_reasons(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in rsvd_unavailable_reason("triton", cpu)
    with pytest.raises(
        ValueError,
        match=r"backend 'triton' cannot run the randomized SVD on cpu: .*TRITON_INTERPRET",
    ):
        select_rsvd_steps("triton", cpu)
    assert rsvd_unavailable_reason("torch", cpu) is None
    assert auto_rsvd_backend(cpu) == "torch"
    assert select_rsvd_steps("auto", cpu).name == "torch"


@pytest.mark.parametrize("dtype", DTYPES)
def test_factor_svd_matches_dense_svd(dtype):
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(3, 50, 8, generator=gen, dtype=dtype)
    q = torch.randn(3, 35, 8, generator=gen, dtype=dtype)
    u, s, v = factor_svd(p, q)
    assert u.shape == (3, 50, 8) and s.shape == (3, 8) and v.shape == (3, 35, 8)
    dense = p @ q.mT
    exact = torch.linalg.svdvals(dense.double())[..., :8]
    assert (s.double() - exact).abs().max() <= ABS_TOL[dtype] * exact.max()
    rebuilt = (u * s[..., None, :]) @ v.mT
    assert (rebuilt - dense).abs().max() <= 10 * ABS_TOL[dtype] * exact.max()
    u3, s3, _ = factor_svd(p, q, rank=3)
    assert u3.shape == (3, 50, 3) and torch.allclose(s3, s[..., :3])
    with pytest.raises(ValueError, match="rank must be in"):
        factor_svd(p, q, rank=9)
    with pytest.raises(ValueError, match="same k"):
        factor_svd(p, q[..., :5])


def test_principal_cosines_of_planted_angles():
    gen = torch.Generator().manual_seed(4)
    basis = _orthonormal(20, 6, gen)
    angles = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    # range(A) = span(e0, e1, e2); range(B) rotates e_i towards e_{i+3} by angles[i].
    a = basis[:, :3] @ torch.randn(3, 3, dtype=torch.float64, generator=gen)  # not orthonormal
    b = basis[:, :3] * angles.cos() + basis[:, 3:] * angles.sin()
    cos = principal_cosines(a, b)
    assert torch.allclose(cos, angles.cos().sort(descending=True).values, atol=1e-12)
    batched = principal_cosines(torch.stack([a, b]), torch.stack([b, b]))
    assert torch.allclose(batched[0], cos, atol=1e-12) and torch.allclose(
        batched[1], torch.ones(3, dtype=torch.float64)
    )
    orth = _orthonormal(20, 2, gen)
    assert principal_cosines(orth, orth, orthonormal=True).min() > 1 - 1e-12
    with pytest.raises(ValueError, match="same m"):
        principal_cosines(a, b[:10])


def test_gram_trace_norms_match_dense():
    gen = torch.Generator().manual_seed(6)
    u, v = (
        torch.randn(30, 4, generator=gen, dtype=torch.float64),
        torch.randn(20, 4, generator=gen, dtype=torch.float64),
    )
    p, q = (
        torch.randn(5, 30, 3, generator=gen, dtype=torch.float64),
        torch.randn(5, 20, 3, generator=gen, dtype=torch.float64),
    )
    assert torch.allclose(factored_sq_norm(u, v), (u @ v.T).pow(2).sum())
    dist = factored_sq_distance(u, v, p, q)
    dense = (u @ v.T - p @ q.mT).pow(2).sum(dim=(-2, -1))
    assert dist.shape == (5,) and torch.allclose(dist, dense)
    assert factored_sq_distance(u, v, u, v) == 0.0  # clamped, never negative
    with pytest.raises(ValueError, match="same k"):
        factored_sq_norm(u, v[:, :3])


needs_jacobi = pytest.mark.skipif(
    rsvd_unavailable_reason("cuda", torch.device("cpu")) is not None,
    reason=f"the extension's Jacobi SVD is unavailable: {rsvd_unavailable_reason('cuda', torch.device('cpu'))}",
)


@needs_jacobi
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 24, 24), (3, 40, 17), (2, 9, 30), (1, 1, 1)])
def test_jacobi_svd_matches_torch(shape, dtype):
    from attrspace.backends.jacobi import jacobi_svd

    gen = torch.Generator().manual_seed(9)
    a = torch.randn(*shape, generator=gen, dtype=dtype)
    if shape[0] > 1:
        a[1, :, -1] = a[1, :, 0]  # exactly rank-deficient
        a[-1] = 0.0
    original = a.clone()
    u, s, v = jacobi_svd(a)
    k = min(shape[1:])
    assert torch.equal(a, original), "the input must not be modified"
    assert (
        u.shape == (shape[0], shape[1], k)
        and s.shape == (shape[0], k)
        and v.shape == (shape[0], shape[2], k)
    )
    exact = torch.linalg.svdvals(a.double())
    scale = exact.max().clamp_min(1.0)
    assert (s.double() - exact).abs().max() <= ABS_TOL[dtype] * scale
    eye = torch.eye(k, dtype=dtype)
    assert (u.mT @ u - eye).abs().max() < 10 * ABS_TOL[dtype]
    assert (v.mT @ v - eye).abs().max() < 10 * ABS_TOL[dtype]
    assert ((u * s[:, None, :]) @ v.mT - a).abs().max() <= 10 * ABS_TOL[dtype] * scale


@needs_jacobi
def test_jacobi_svd_reports_non_convergence(monkeypatch):
    import attrspace.backends.jacobi as svd_native

    monkeypatch.setattr(svd_native, "MAX_SWEEPS", 1)
    with pytest.raises(RuntimeError, match="did not converge in 1 sweeps"):
        svd_native.jacobi_svd(torch.randn(2, 12, 12))
