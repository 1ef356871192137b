"""Randomized SVD (Halko, Martinsson and Tropp 2011) of many matrices at once, batched by shape.

For each operator C (m x n) and l = min(rank + oversample, m, n) sketch columns:
    Y = C Omega                      Omega: (n, l) Gaussian sketch
    repeat power_iters times:        Y = orth(Y); Z = orth(C^T Y); Y = C Z
    Y = orth(Y)                      (m, l) orthonormal basis of the sketched range
    Z = C^T Y;  Q_B = orth(Z)        (n, l); Y^T C = Z^T = (Z^T Q_B) Q_B^T
    Z^T Q_B = U_c S V_c^T            the small (l, l) SVD
    U = Y U_c[:, :rank],  V = Q_B V_c[:, :rank]
Power iterations raise the spectrum to the power 2 power_iters + 1: the error in sigma_j shrinks roughly
like (sigma_{l+1} / sigma_j)^(4 power_iters + 2).

Dense operators run these steps as written. In factor form C = P Q^T (P: m x kr, Q: n x kr, kr small)
nothing of size m x n is formed, and the power iterations run in kr-dimensional coordinates: with
G_P = P^T P and G_Q = Q^T Q, a basis Y = P T_y is orthonormal when T_y^T G_P T_y = I, C^T Y = Q (G_P T_y)
and C Z = P (G_Q T_z). The two Gram matrices cost 2 (m + n) kr^2 flops, as much as three applications of
C and C^T to l = 24 columns at kr = 160, but as one efficient GEMM per factor (77 GFLOP/s on one core of
the benchmark CPU against 25-40 for the 16-24 column products), and every power iteration after them
costs O(kr^2 l). These coordinate steps, and a Rayleigh-Ritz step in coordinates that picks the leading
`rank` directions, only steer: the result comes from a Rayleigh-Ritz step on the real factors at width
`rank` (U0 = P T_u and C^T U0 = Q (P^T U0), each orthonormalised by real CholeskyQR passes), so its accuracy does not
inherit the Gram matrices' rounding. That step passes twice over P and once over Q, so an operator with
m > n is decomposed as C^T = Q P^T (the long side passed over once). The coordinate steps run in the data's
dtype: a Gram matrix resolves directions down to about sqrt(eps) of the largest singular value, so in
float32 the steering finds singular directions below ~3e-4 sigma_1 only roughly (their values are still
those of U0^T C for the subspace found); spectra spanning more decades than that need float64 input.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from attrspace.backends import RsvdSteps, select_rsvd_steps
from attrspace.linalg._operators import (
    Chunks,
    Operator,
    OperatorGroup,
    checked_dense,
    checked_gram,
    group_operators,
)


def _hmt_dense(steps: RsvdSteps, a: Tensor, omega: Tensor, rank: int, power_iters: int):
    """a (b, m, n), omega (b, n, l) -> U (b, m, rank), S (b, rank), V (b, n, rank)."""
    mm = steps.matmul
    y = mm(a, omega, False)
    for _ in range(power_iters):
        y = steps.orthonormalize(y, 1)
        z = steps.orthonormalize(mm(a, y, True), 1)
        y = mm(a, z, False)
    y = steps.orthonormalize(y, 3)
    return _rayleigh_ritz(steps, y, mm(a, y, True), rank)


def _shifted_cholesky(s: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of s + k eps tr(s) I for s (b, k, k), and a (b,) mask of the matrices
    where it exists (the shift, at the accuracy eps of a Gram matrix formed in the data's
    dtype, keeps it defined for a singular s; a zero s has none, and gets the identity)."""
    width = s.shape[-1]
    trace = s.diagonal(dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(width, dtype=s.dtype, device=s.device)
    r, info = torch.linalg.cholesky_ex(s + (width * eps * trace)[:, None, None] * eye, upper=True)
    usable = (info == 0) & (trace > 0)
    return torch.where(usable[:, None, None], r, eye.expand_as(s)), usable


def _orthonormalize_in_metric(t: Tensor, gram: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Coordinates t (b, k, l) of Y = F t, gram = F^T F (b, k, k) -> (t R^-1,
    gram t R^-1, R): F t R^-1 is orthonormal up to the Gram matrix's rounding, R (b, l, l) is upper
    triangular, and gram t R^-1 = F^T (F t R^-1) comes with it because forming S = t^T gram t needs
    gram t anyway (the next power-iteration step starts from it)."""
    h = gram @ t
    r, _ = _shifted_cholesky(t.mT @ h, eps)
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    r_inv = torch.linalg.solve_triangular(r, eye, upper=True)
    return t @ r_inv, h @ r_inv, r


def _hmt_factored(
    steps: RsvdSteps,
    p: Tensor,
    q: Tensor,
    grams: tuple[Tensor, Tensor],
    omega: Tensor,
    rank: int,
    power_iters: int,
):
    """p (b, m, kr), q (b, n, kr), grams (P^T P, Q^T Q) (b, kr, kr), omega (b, kr, l) Gaussian
    -> U (b, m, rank), S (b, rank), V (b, n, rank)."""
    mm = steps.matmul
    eps = torch.finfo(p.dtype).eps
    g_p, g_q = grams
    # Y = C Omega = P (Q^T Omega). For a Gaussian Omega (n, l), Q^T Omega is Gaussian with covariance
    # G_Q: drawn as R_Q^T omega (G_Q = R_Q^T R_Q, shifted) it costs no pass over Q.
    t_y = _shifted_cholesky(g_q, eps)[0].mT @ omega
    # Y = P t_y, G_P t_y = P^T Y = coordinates of C^T Y in Q; G_Q t_z = coordinates of C Z in P.
    for _ in range(power_iters):
        t_y, g_p_t_y, _ = _orthonormalize_in_metric(t_y, g_p, eps)
        _, t_y, _ = _orthonormalize_in_metric(g_p_t_y, g_q, eps)
    t_y, g_p_t_y, _ = _orthonormalize_in_metric(t_y, g_p, eps)
    # Rayleigh-Ritz in coordinates: C^T Y = Q (G_P T_y) = (Q T_z) R_z, so Y^T C ~ R_z^T on the
    # G_Q-orthonormal basis Q T_z; its leading `rank` left singular vectors give U0 = P T_u.
    r_z = _orthonormalize_in_metric(g_p_t_y, g_q, eps)[2]
    u_c = steps.small_svd(r_z.mT)[0]
    t_u = t_y @ u_c[..., :rank]
    # Rayleigh-Ritz on the real factors at width `rank`, so that the result does not inherit the Gram
    # matrices' rounding. U0 = P T_u is orthonormal up to that rounding: one real CholeskyQR pass
    # usually finishes it. V0 = C^T U0 = Q (P^T U0) is formed for real; its coordinate R factor
    # (from W^T G_Q W) preconditions it, V0 R_w^-1, for one real pass too. V0 itself, not V0 R_w^-1 R_w,
    # enters the small matrix U0^T C Q_W = V0^T Q_W, whose SVD rotates U0 and Q_W.
    u0 = steps.orthonormalize(mm(p, t_u, False), 3)
    w = mm(p, u0, True)
    v0 = mm(q, w, False)
    r_w = _orthonormalize_in_metric(w, g_q, eps)[2]
    eye = torch.eye(r_w.shape[-1], dtype=r_w.dtype, device=r_w.device)
    q_w = steps.orthonormalize(
        mm(v0, torch.linalg.solve_triangular(r_w, eye, upper=True), False), 3
    )
    u_r, s, v_r = steps.small_svd(mm(v0, q_w, True))
    return mm(u0, u_r, False), s, mm(q_w, v_r, False)


def _rayleigh_ritz(steps: RsvdSteps, y: Tensor, z: Tensor, rank: int):
    """y (b, m, l) orthonormal, z = C^T y (b, n, l) -> the rank leading triplets of Y Y^T C."""
    mm = steps.matmul
    q_b = steps.orthonormalize(z, 3)
    u_c, s, v_c = steps.small_svd(mm(z, q_b, True))
    return mm(y, u_c[..., :rank], False), s[..., :rank], mm(q_b, v_c[..., :rank], False)


def _gram(steps: RsvdSteps, x: Tensor) -> Tensor:
    return steps.matmul(x, x, True)


def _check_arguments(rank: int, oversample: int, power_iters: int) -> None:
    for name, value, low in (
        ("rank", rank, 1),
        ("oversample", oversample, 0),
        ("power_iters", power_iters, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def _sketch_width(group: OperatorGroup, rank: int, oversample: int) -> int:
    width = min(rank + oversample, group.m, group.n)
    # A factored operator has rank <= kr: more sketch columns than that only add dependent ones.
    return max(rank, min(width, group.kr)) if group.factored else width


def _factored_chunk(steps, group, first, second, indices, sketch, rank, power_iters):
    """U, S, V of one chunk of factored operators C = P Q^T, and the scale S must be multiplied by."""
    gram = functools.partial(_gram, steps)
    g_p, scale_p = checked_gram(first, gram, indices, " (factor P)")
    g_q, scale_q = checked_gram(second, gram, indices, " (factor Q)")
    if group.m > group.n:  # decompose C^T = Q P^T: see the module docstring
        v, s, u = _hmt_factored(steps, second, first, (g_q, g_p), sketch, rank, power_iters)
    else:
        u, s, v = _hmt_factored(steps, first, second, (g_p, g_q), sketch, rank, power_iters)
    return u, s, v, scale_p * scale_q


def randomized_svd(
    ops: Sequence[Operator],
    rank: int,
    oversample: int = 8,
    power_iters: int = 2,
    backend: str = "auto",
    generator: torch.Generator | None = None,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Truncated SVDs of many matrices of mixed shapes, batched by shape.

    ops: a list whose items are a dense A: (m, n) or a factor pair (P: (m, kr), Q: (n, kr)) meaning
    C = P Q^T (never formed). float32 or float64, any device; shapes may differ between items.
    rank: singular triplets per operator, 1 <= rank <= min(m, n). oversample: extra sketch columns
    (l = min(rank + oversample, m, n), and at most max(kr, rank) in factor form). power_iters: power
    iterations, each one application of C and one of C^T. backend: "auto", "torch" (reference), "triton"
    or "cuda" (see attrspace.backends.ops). generator: drives the Gaussian sketch, drawn on the
    generator's device.

    Returns, per operator in input order, (U (m, rank), S (rank,), V (n, rank)) in the operator's dtype
    and device, with C ~ U diag(S) V^T, S descending, U and V with orthonormal columns. In factor form
    the sketch is steered by Gram matrices, so in float32 singular directions below about 3e-4 sigma_1
    are found only roughly (see the module docstring); pass float64 factors for such spectra.
    Raises TypeError/ValueError naming the operator for bad types, shapes, NaN or Inf.
    """
    _check_arguments(rank, oversample, power_iters)
    groups = group_operators(ops, rank)
    results: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(ops)
    for group in groups:
        steps = select_rsvd_steps(backend, group.device)
        width = _sketch_width(group, rank, oversample)
        draw_on = generator.device if generator is not None else group.device
        # Dense operators are sketched by Omega (n, l); factored ones in kr coordinates (_hmt_factored).
        sketched = group.kr if group.factored else group.n
        omega = torch.randn(
            (len(group.indices), sketched, width),
            generator=generator,
            dtype=group.dtype,
            device=draw_on,
        ).to(group.device)
        for start, indices, first, second in Chunks(ops, group):
            sketch = omega[start : start + len(indices)]
            if second is None:
                scale = checked_dense(first, indices)
                u, s, v = _hmt_dense(steps, first, sketch, rank, power_iters)
            else:
                u, s, v, scale = _factored_chunk(
                    steps, group, first, second, indices, sketch, rank, power_iters
                )
            s = s * scale
            for j, i in enumerate(indices):
                results[i] = (u[j], s[j], v[j])
    return results  # type: ignore[return-value]
