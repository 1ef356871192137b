"""The adapter math in plain torch: the truth in tests and the `torch` backend's implementation.

Notation (design section 2), T tokens, K the subspace rank:
    z = x V              (T, K)      projection of the input onto the frozen row basis
    P = s U M            (d_out, K)  the adapter's output map, formed in fp32 by the caller
    y = x W^T + b + z P^T
    g = dy U             (T, K)
    Q = s V M^T          (d_in, K)   formed in fp32 by the caller
    dx = dy W + g Q^T
    dM = s g^T z         (K, K)

Every backend forms y and dx in fp32 and rounds once to the input dtype, so a small adapter term survives
in bf16 (added to an already-rounded bf16 base output, about half of a 1e-3 contribution would be lost).
The torch backend does it in bf16 / fp16 with one GEMM over the concatenated inner dimension
(y = [x | z] [W | P]^T, dx = [dy | g] [W ; Q^T]): cuBLAS (and the CPU's GEMM) accumulate in fp32 inside.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter terms are accumulated in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unavailable_reason() -> str | None:
    """The torch backend runs everywhere."""
    return None


def unsupported_reasons(x: Tensor, weight: Tensor, rank: int) -> list[str]:
    """The torch backend runs any floating dtype, device and size."""
    return []


def forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, V: Tensor, P: Tensor
) -> tuple[Tensor, Tensor]:
    """y = x W^T + b + z P^T and z = x V, accumulated in fp32, each rounded once to x.dtype.

    x: (T, d_in); weight: (d_out, d_in); bias: (d_out,) or None; V: (d_in, K) in x.dtype;
    P: (d_out, K) fp32. Returns y: (T, d_out) and z: (T, K), both x.dtype.
    """
    if x.dtype in _LOW_PRECISION:
        return _forward_concat(x, weight, bias, V, P)
    # fp32 (and fp64): fold the adapter into an effective weight on the fly. At T tokens it costs
    # d_out*d_in*K flops instead of T*d_out*K; the fold is a temporary, never written to the layer.
    z = x @ V
    w_eff = torch.addmm(weight, P.to(x.dtype), V.t())
    y = torch.addmm(bias, x, w_eff.t()) if bias is not None else x @ w_eff.t()
    return y, z


def backward(
    dy: Tensor, weight: Tensor, U: Tensor, Q: Tensor, need_dx: bool
) -> tuple[Tensor | None, Tensor]:
    """dx = dy W + g Q^T (or None when not needed) and g = dy U in fp32.

    dy: (T, d_out); weight: (d_out, d_in); U: (d_out, K) in dy.dtype; Q = s V M^T: (d_in, K) fp32.
    Returns dx: (T, d_in) dy.dtype and g: (T, K) fp32.
    """
    if dy.dtype in _LOW_PRECISION:
        return _backward_concat(dy, weight, U, Q, need_dx)
    # Fold again: U Q^T = s U M V^T, so dx = dy (W + U Q^T) is one GEMM (d_out*d_in*K flops to fold,
    # against T*d_in*K for g Q^T plus an extra pass over dx).
    g = dy @ U
    dx = dy @ torch.addmm(weight, U, Q.to(dy.dtype).t()) if need_dx else None
    return dx, g.to(accum_dtype(dy.dtype))


def _forward_concat(
    x: Tensor, weight: Tensor, bias: Tensor | None, V: Tensor, P: Tensor
) -> tuple[Tensor, Tensor]:
    """bf16 / fp16: y = [x | z] [W | P]^T + b, one GEMM over the inner dimension d_in + K.

    The GEMM accumulates the base and the adapter term together in fp32 and rounds once, so a small
    update survives, at the cost of the frozen layer's GEMM on K more columns; an fp32 upcast of x and
    W instead would run the whole layer on the (10-20x slower on a GPU) fp32 units. An effective
    weight W + P V^T folded in bf16 would round the update away (tests/test_functional.py).
    """
    z = x @ V
    xz = torch.cat((x, z), dim=1)
    wp = torch.cat((weight, P.to(x.dtype)), dim=1)
    y = torch.addmm(bias, xz, wp.t()) if bias is not None else xz @ wp.t()
    return y, z


def _backward_concat(
    dy: Tensor, weight: Tensor, U: Tensor, Q: Tensor, need_dx: bool
) -> tuple[Tensor | None, Tensor]:
    """bf16 / fp16: dx = [dy | g] [W ; Q^T], one GEMM over d_out + K rounded once, g = dy U."""
    g = dy @ U
    dx = None
    if need_dx:
        wq = torch.cat((weight, Q.to(dy.dtype).t()), dim=0)
        dx = torch.cat((dy, g), dim=1) @ wq
    return dx, g.float()


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
