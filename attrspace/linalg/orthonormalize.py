"""Batched re-orthonormalisation of tall skinny matrices by CholeskyQR, in plain torch.

CholeskyQR costs two thin GEMMs per pass (the l x l Gram matrix and Y R^-1), where Householder QR on a
CPU runs a LAPACK call per matrix. The Cholesky factor is computed in float64, and so is the Gram matrix
unless the columns are already close to orthonormal (max |G - I| < 0.1, judged from the cheap Gram
matrix in the data's dtype, which is then accurate to working precision): mixed precision CholeskyQR, so
that for float32 data a pass breaks down only when cond(Y) nears 1e8, and each pass cuts the loss of
orthogonality to about eps(dtype) * cond(Y). The first pass adds the shift 11 (r l + l (l + 1)) eps64
tr(G) of shifted CholeskyQR, which keeps its Cholesky defined up to cond(Y) ~ 1e15. A pass whose Gram
matrix is within sqrt(eps) of the identity leaves the columns orthonormal to working precision and is
the last one. A Y whose columns are exactly dependent has no orthonormal basis of the same width inside
its span; the matrices whose Cholesky still fails are redone with Householder QR, which completes the
basis.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS64 = torch.finfo(torch.float64).eps
# Cholesky pivots below _BREAKDOWN times the Gram diagonal count as a breakdown (dependent columns).
_BREAKDOWN = 64 * _EPS64


def shift_for(gram: Tensor, rows: int) -> Tensor:
    """The shifted-CholeskyQR shift per matrix: gram (..., l, l) float64 -> (..., 1, 1)."""
    cols = gram.shape[-1]
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (11.0 * (rows * cols + cols * (cols + 1)) * _EPS64 * trace)[..., None, None]


def cholesky_qr(y: Tensor, passes: int) -> Tensor:
    """Orthonormal basis of range(y), batched: y (b, r, l) float32/float64 with r >= l -> (b, r, l).

    At most `passes` passes (>= 1), fewer when the columns become orthonormal sooner (an input that is
    already orthonormal to sqrt(eps) takes one unshifted pass).
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    eye = torch.eye(y.shape[-1], dtype=torch.float64, device=y.device)
    settled = torch.finfo(y.dtype).eps ** 0.5
    for p in range(passes):
        gram = (y.mT @ y).double()
        gap = float((gram - eye).abs().amax())
        if gap >= 0.1 and y.dtype != torch.float64:
            y64 = y.double()
            gram = y64.mT @ y64
        if gap < settled:
            passes = p + 1  # this pass makes the columns orthonormal to working precision
        elif p == 0:
            gram = gram + shift_for(gram, y.shape[-2]) * eye
        r, info = torch.linalg.cholesky_ex(gram, upper=True)
        # A pivot at rounding level means dependent columns too: R^-1 would blow up rounding noise.
        weak = r.diagonal(dim1=-2, dim2=-1).square() <= _BREAKDOWN * gram.diagonal(dim1=-2, dim2=-1)
        failed = (info != 0) | weak.any(dim=-1)
        r_inv = torch.linalg.solve_triangular(r, eye, upper=True).to(y.dtype)
        if bool(failed.any()):
            q = torch.empty_like(y)
            q[failed] = torch.linalg.qr(y[failed]).Q
            ok = ~failed
            q[ok] = y[ok] @ r_inv[ok]
            y = q
        else:
            # Y R^-1 as a GEMM with the explicit l x l inverse: a batched right-sided triangular solve
            # on the (b, r, l) block copies it to column-major first and was 2x slower.
            y = y @ r_inv
        if p + 1 >= passes:
            break
    return y
