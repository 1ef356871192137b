"""The adapter math in plain torch: the truth that every backend (attrspace.backends) is tested against.

Notation (docs/design.md §2), T tokens, K the subspace rank:
    z = x V              (T, K)      projection of the input onto the frozen row basis
    P = s U M            (d_out, K)  the adapter's output map, formed in fp32 by the caller
    y = x W^T + b + z P^T
    g = dy U             (T, K)
    Q = s V M^T          (d_in, K)   formed in fp32 by the caller
    dx = dy W + g Q^T
    dM = s g^T z         (K, K)

Every backend forms y and dx in fp32 and rounds once to the input dtype, so a small adapter term survives
in bf16 (added to an already-rounded bf16 base output, about half of a 1e-3 contribution would be lost).
The functions here do it the plain way, in fp32 (fp64) throughout; the fast paths are in
attrspace.backends.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter terms are accumulated in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, V: Tensor, P: Tensor
) -> tuple[Tensor, Tensor]:
    """The truth of every backend's forward: y = x W^T + b + z P^T and z = x V, computed in the
    accumulation dtype and rounded once to x.dtype.

    x: (T, d_in); weight: (d_out, d_in); bias: (d_out,) or None; V: (d_in, K) in x.dtype;
    P: (d_out, K) fp32. Returns y: (T, d_out) and z: (T, K), both x.dtype.
    """
    acc = accum_dtype(x.dtype)
    xa = x.to(acc)
    z = xa @ V.to(acc)
    y = xa @ weight.to(acc).t() + z @ P.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), z.to(x.dtype)


def backward(
    dy: Tensor, weight: Tensor, U: Tensor, Q: Tensor, need_dx: bool
) -> tuple[Tensor | None, Tensor]:
    """The truth of every backend's backward: dx = dy W + g Q^T (None unless need_dx), rounded once to
    dy.dtype, and g = dy U in the accumulation dtype.

    dy: (T, d_out); weight: (d_out, d_in); U: (d_out, K) in dy.dtype; Q = s V M^T: (d_in, K) fp32.
    """
    acc = accum_dtype(dy.dtype)
    dya = dy.to(acc)
    g = dya @ U.to(acc)
    dx = (dya @ weight.to(acc) + g @ Q.to(acc).t()).to(dy.dtype) if need_dx else None
    return dx, g


def empty_forward_outputs(x: Tensor, weight: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Uninitialised y (T, d_out) and z (T, K) in x's dtype: what every backend's forward returns
    (the fake implementation of the custom ops, and their output buffers)."""
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], V.shape[1]))


def empty_backward_outputs(
    dy: Tensor, weight: Tensor, U: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor]:
    """Uninitialised dx (T, d_in) in dy's dtype and g (T, K) fp32. A custom op cannot return None, so
    without need_dx dx is an empty (0, d_in) tensor."""
    dx = dy.new_empty((dy.shape[0] if need_dx else 0, weight.shape[1]))
    return dx, dy.new_empty((dy.shape[0], U.shape[1]), dtype=torch.float32)


def grad_m(g: Tensor, z: Tensor, scale: float) -> Tensor:
    """dM = s g^T z in g's dtype. g: (T, K) fp32 (fp64), z: (T, K) -> (K, K)."""
    return scale * (g.t() @ z.to(g.dtype))


def dense_subspace_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, M: Tensor, scale: float
) -> Tensor:
    """The textbook formula y = x (W + s U M V^T)^T + b, autograd-differentiable; for tests only."""
    delta = scale * (U @ M @ V.t())
    y = x @ (weight + delta).t()
    return y + bias if bias is not None else y


def lora_delta(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """LoRA update s B A. A: (r, d_in), B: (d_out, r) -> (d_out, d_in)."""
    return scale * (B @ A)
