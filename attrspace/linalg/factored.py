"""Exact computations on factored matrices C = P Q^T and on column spaces, batched.

Used by the mining step and as the checking path of `randomized_svd`: nothing here forms an m x n
matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_pair(p: Tensor, q: Tensor, names: str = "P, Q") -> None:
    if not isinstance(p, Tensor) or not isinstance(q, Tensor):
        raise TypeError(f"{names} must be tensors")
    if p.ndim < 2 or q.ndim < 2 or p.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{names} must have shapes (..., m, k) and (..., n, k) with the same k, "
            f"got {tuple(p.shape)} and {tuple(q.shape)}"
        )
    if not p.is_floating_point() or p.dtype != q.dtype:
        raise TypeError(f"{names} must share one floating dtype, got {p.dtype} and {q.dtype}")


def factor_svd(p: Tensor, q: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Exact SVD of C = P Q^T through thin QRs: P = Q_P R_P, Q = Q_Q R_Q, R_P R_Q^T = U_c S V_c^T.

    p: (..., m, kr), q: (..., n, kr) with matching batch dims. Returns U (..., m, r), S (..., r),
    V (..., n, r) with r = rank, or min(m, n, kr) when rank is None; S descending.
    Costs two Householder QRs and one kr x kr SVD per matrix.
    """
    _check_pair(p, q)
    full = min(p.shape[-2], q.shape[-2], p.shape[-1])
    if rank is None:
        rank = full
    if not 1 <= rank <= full:
        raise ValueError(f"rank must be in [1, {full}] = [1, min(m, n, kr)], got {rank}")
    q_p, r_p = torch.linalg.qr(p)
    q_q, r_q = torch.linalg.qr(q)
    u_c, s, vh_c = torch.linalg.svd(r_p @ r_q.mT, full_matrices=False)
    return q_p @ u_c[..., :rank], s[..., :rank], q_q @ vh_c.mT[..., :rank]


def principal_cosines(a: Tensor, b: Tensor, orthonormal: bool = False) -> Tensor:
    """Cosines of the principal angles between range(A) and range(B), descending, batched.

    a: (..., m, p), b: (..., m, q), full column rank (or orthonormal columns with orthonormal=True, which
    skips the QRs). Returns (..., min(p, q)) in [0, 1]; the first entry is cos(theta_1), so
    1 - result[..., 0] is the disentanglement score (1: orthogonal spaces, 0: a shared direction).
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError("a and b must be tensors")
    if a.ndim < 2 or b.ndim < 2 or a.shape[-2] != b.shape[-2]:
        raise ValueError(
            f"a (..., m, p) and b (..., m, q) need the same m, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if not orthonormal:
        a = torch.linalg.qr(a).Q
        b = torch.linalg.qr(b).Q
    return torch.linalg.svdvals(a.mT @ b).clamp(0.0, 1.0)


def factored_sq_norm(x: Tensor, y: Tensor) -> Tensor:
    """||X Y^T||_F^2 = tr((X^T X)(Y^T Y)), batched: x (..., m, k), y (..., n, k) -> (...)."""
    _check_pair(x, y, "X, Y")
    return ((x.mT @ x) * (y.mT @ y)).sum(dim=(-2, -1))


def factored_sq_distance(u: Tensor, v: Tensor, p: Tensor, q: Tensor) -> Tensor:
    """||U V^T - P Q^T||_F^2 from Gram matrices, batched with broadcasting.

    u: (..., m, d), v: (..., n, d), p: (..., m, k), q: (..., n, k) -> (...), e.g. one consensus U, V
    against a stack of k-rank updates P_i: (a, m, k). Expanded as
    ||U V^T||^2 - 2 <U^T P, V^T Q> + ||P Q^T||^2: in fp32 a distance below about 1e-3 of the norms
    loses digits to cancellation (clamped at 0, never negative).
    """
    _check_pair(u, v, "U, V")
    _check_pair(p, q, "P, Q")
    cross = ((u.mT @ p) * (v.mT @ q)).sum(dim=(-2, -1))
    total = factored_sq_norm(u, v) - 2.0 * cross + factored_sq_norm(p, q)
    return total.clamp_min(0.0)
