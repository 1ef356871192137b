"""The `torch` backend: plain torch GEMMs on any device, the fallback that is never slow.

fp32 / fp64 fold the adapter into an effective weight on the fly (W + P V^T forward, W + U Q^T
backward): d_out * d_in * K flops per pass whatever T is, and the fold is a temporary, never written
to the layer. bf16 / fp16 cannot fold (an update rounded into a bf16 weight is mostly lost, see
tests/adapters/test_functional.py) and must not upcast (fp32 GEMMs run 10-20x slower than bf16 ones on a GPU),
so they run one GEMM over the concatenated inner dimension,
    y  = [x | z] [W | P]^T + b        (inner dimension d_in + K)
    dx = [dy | g] [W ; Q^T]           (inner dimension d_out + K)
where cuBLAS accumulates the base and the adapter term together in fp32 and rounds once. The extra
cost is the frozen GEMM on K more columns plus a copy of x (dy) into the wider buffer. On a CPU the
bf16 GEMM itself is the slow one (no bf16 matrix units on the CPU of bench/RESULTS.md: 1024 -> 3072 at
T = 2048 took 21 s concatenated against 0.45 s upcast), so CPU tensors run the reference's fp32 GEMMs
(attrspace.adapters.reference), which round once as well. Both paths run on any device; tests/backends/test_torch_backend.py checks both.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from attrspace.adapters import reference
from attrspace.adapters.reference import accum_dtype
from attrspace.linalg.orthonormalize import cholesky_qr

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def unavailable_reason() -> str | None:
    """The torch backend runs everywhere."""
    return None


def unsupported_reasons(x: Tensor, weight: Tensor, rank: int) -> list[str]:
    """The torch backend runs any floating dtype, device and size."""
    return []


def forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, V: Tensor, P: Tensor
) -> tuple[Tensor, Tensor]:
    """y = x W^T + b + z P^T and z = x V, each rounded once to x.dtype (see reference.forward)."""
    if x.dtype in _LOW_PRECISION:
        return (forward_concat if x.is_cuda else reference.forward)(x, weight, bias, V, P)
    z = x @ V
    w_eff = torch.addmm(weight, P.to(x.dtype), V.t())
    y = torch.addmm(bias, x, w_eff.t()) if bias is not None else x @ w_eff.t()
    return y, z


# The low-precision paths keep, per frozen weight W (d_out, d_in), one persistent buffer
#     [[W, P], [Q^T, 0]]  of shape (d_out + K, d_in + K)
# whose top rows are [W | P] (the forward's weight) and whose left columns are [W ; Q^T] (the
# backward's): W is copied in once, and a step writes only P (d_out x K) or Q^T (K x d_in). cuBLAS
# reads either block in place through its leading dimension. The buffer holds a second copy of W's
# memory, in exchange for the two W-sized copies per step that cat() made. It is rebuilt when W is
# modified in place (its version counter moves). torch.compile traces the cat() form instead.
_BUFFERS: dict[int, tuple] = {}  # id(W) -> (weakref to W, W's version, buffer)


def _weight_buffer(weight: Tensor, rank: int) -> Tensor:
    entry = _BUFFERS.get(id(weight))
    if (
        entry is not None
        and entry[0]() is weight
        and entry[1] == weight._version
        and entry[2].shape[0] == weight.shape[0] + rank
    ):
        return entry[2]
    d_out, d_in = weight.shape
    buf = weight.new_zeros(d_out + rank, d_in + rank)
    buf[:d_out, :d_in] = weight
    key = id(weight)
    # (a Tensor cannot key a WeakKeyDictionary: its == is elementwise)
    ref = weakref.ref(weight, lambda _, key=key: _BUFFERS.pop(key, None))
    _BUFFERS[key] = (ref, weight._version, buf)
    return buf


def forward_concat(
    x: Tensor, weight: Tensor, bias: Tensor | None, V: Tensor, P: Tensor
) -> tuple[Tensor, Tensor]:
    """bf16 / fp16 forward as one GEMM over [x | z] and [W | P]."""
    z = x @ V
    xz = torch.cat((x, z), dim=1)
    d_out, K = weight.shape[0], V.shape[1]
    if torch.compiler.is_compiling():
        wp = torch.cat((weight, P.to(x.dtype)), dim=1)
    else:
        buf = _weight_buffer(weight, K)
        buf[:d_out, -K:] = P
        wp = buf[:d_out]
    y = torch.addmm(bias, xz, wp.t()) if bias is not None else xz @ wp.t()
    return y, z


def backward(
    dy: Tensor, weight: Tensor, U: Tensor, Q: Tensor, need_dx: bool
) -> tuple[Tensor | None, Tensor]:
    """dx = dy W + g Q^T (None unless need_dx) in dy.dtype and g = dy U in fp32 (fp64 for fp64)."""
    if dy.dtype in _LOW_PRECISION:
        return (backward_concat if dy.is_cuda else reference.backward)(dy, weight, U, Q, need_dx)
    g = dy @ U
    dx = dy @ torch.addmm(weight, U, Q.to(dy.dtype).t()) if need_dx else None
    return dx, g.to(accum_dtype(dy.dtype))


def backward_concat(
    dy: Tensor, weight: Tensor, U: Tensor, Q: Tensor, need_dx: bool
) -> tuple[Tensor | None, Tensor]:
    """bf16 / fp16 backward as one GEMM over [dy | g] and [W ; Q^T]. g is rounded to dy.dtype by its
    GEMM (it enters the concatenated GEMM in that dtype) and returned widened; dM = s g^T z carries
    that rounding, as it carries z's."""
    g = dy @ U
    dx = None
    if need_dx:
        d_in, K = weight.shape[1], U.shape[1]
        if torch.compiler.is_compiling():
            wq = torch.cat((weight, Q.to(dy.dtype).t()), dim=0)
        else:
            buf = _weight_buffer(weight, K)
            buf[-K:, :d_in] = Q.t()
            wq = buf[:, :d_in]
        dx = torch.cat((dy, g), dim=1) @ wq
    return dx, g.float()


def forward_factored(
    x: Tensor, weight: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, M: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """forward() from the factors (M in fp32, fp64 for fp64): in fp32 / fp64 the scale goes into the
    fold W + s (U M) V^T, so a step costs fewer ops (host time at small shapes)."""
    if x.dtype in _LOW_PRECISION:
        return forward(x, weight, bias, V, torch.mm(U.to(M.dtype), M).mul_(scale))
    w_eff = torch.addmm(
        weight, torch.mm(U, M if M.dtype == x.dtype else M.to(x.dtype)), V.t(), alpha=scale
    )
    return F.linear(x, w_eff, bias), torch.mm(x, V)


def backward_factored(
    dy: Tensor, weight: Tensor, U: Tensor, V: Tensor, M: Tensor, z: Tensor, scale: float,
    need_dx: bool,
) -> tuple[Tensor | None, Tensor]:  # fmt: skip
    """dx (None unless need_dx) and dM = s g^T z in M's dtype: dx = dy (W + s U M V^T) with the
    forward's fold recomputed (not saved: it is W-sized)."""
    if dy.dtype in _LOW_PRECISION:
        Q = torch.mm(V.to(M.dtype), M.t()).mul_(scale) if need_dx else None
        dx, g = (
            backward(dy, weight, U, Q, True) if need_dx else (None, dy.to(M.dtype) @ U.to(M.dtype))
        )
    else:
        g = torch.mm(dy, U)
        dx = None
        if need_dx:
            UM = torch.mm(U, M if M.dtype == dy.dtype else M.to(dy.dtype))
            dx = torch.mm(dy, torch.addmm(weight, UM, V.t(), alpha=scale))
    dm = torch.mm(g.t(), z if z.dtype == g.dtype else z.to(g.dtype)).mul_(scale)
    return dx, dm if dm.dtype == M.dtype else dm.to(M.dtype)


# Randomized-SVD steps (attrspace.backends.ops): the reference every other backend's steps match.


def rsvd_matmul(a: Tensor, x: Tensor, transpose: bool) -> Tensor:
    if transpose:
        return a.mT @ x
    # a @ x with a narrow x, computed as (x^T a^T)^T: the CPU GEMM then runs a's long dimension as its
    # wide output side; bmm(a, x) itself ran at 13 GFLOP/s against 31 for this form at (3072, 160) x
    # (160, 24) on the benchmark CPU (one thread). The result is a transposed view.
    return torch.bmm(x.mT, a.mT).mT


def rsvd_orthonormalize(y: Tensor, passes: int) -> Tensor:
    return cholesky_qr(y, passes)


def rsvd_small_svd(core: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(core)
    return u, s, vh.mT
