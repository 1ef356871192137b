"""Every op a backend may implement, declared once (name and contract). A backend is one module of
this package that defines some of these functions under these names; `attrspace.backends.registry`
finds them there. See docs/design.md, "Backends".

Adapter ops (every backend defines both, and `unsupported_reasons` for its limits):
    forward(x, weight, bias, V, P) -> (y, z)        x (T, d_in); P = s U M, fp32; see reference.forward
    backward(dy, weight, U, Q, need_dx) -> (dx, g)  Q = s V M^T, fp32; g fp32; see reference.backward

Whole-layer adapter ops (optional; adapters.functional uses them when a backend defines them, so
that a kernel backend forms P, Q and dM inside its own launches):
    forward_factored(x, weight, bias, U, V, M, scale) -> (y, z)
    backward_factored(dy, weight, U, V, M, z, scale, need_dx) -> (dx or None, dM)

Randomized-SVD steps (optional; a backend that does not define one runs the torch backend's), on a
batch of matrices of one shape:
    rsvd_matmul(a, x, transpose)        a (b, r, c) @ x (b, c, l), or a^T @ x with x (b, r, l)
    rsvd_orthonormalize(y, passes)      y (b, r, l), r >= l -> orthonormal basis of range(y)
    rsvd_small_svd(core)                core (b, l, l) -> U (b, l, l), S (b, l) descending, V (b, l, l)
and `rsvd_unavailable_reason(device) -> str | None` where its steps need more than its adapter ops.

Every implementation must match attrspace.adapters.reference (adapter ops) or the torch backend (SVD
steps) on fresh random inputs at the dtype's tolerance, and must not mutate its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attrspace.adapters import reference

ADAPTER_OPS = ("forward", "backward")
WHOLE_LAYER_OPS = ("forward_factored", "backward_factored")
RSVD_OPS = ("rsvd_matmul", "rsvd_orthonormalize", "rsvd_small_svd")


@dataclass(frozen=True)
class RsvdSteps:
    """The randomized-SVD steps of one backend, the torch backend's where it defines none."""

    name: str
    matmul: Callable[[Tensor, Tensor, bool], Tensor]
    orthonormalize: Callable[[Tensor, int], Tensor]
    small_svd: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def _forward_fake(x, weight, bias, V, P):
    return reference.empty_forward_outputs(x, weight, V)


def _backward_fake(dy, weight, U, Q, need_dx):
    return reference.empty_backward_outputs(dy, weight, U, need_dx)


def adapter_custom_ops(backend: str, forward_impl: Callable, backward_impl: Callable):
    """A kernel backend's forward and backward as torch.library custom ops
    `attrspace::<backend>_subspace_forward` / `_backward`, with the one fake (the output shapes of
    the contract) every backend shares, so torch.compile traces through the launch (fullgraph)
    instead of breaking the graph there. The backward op always returns a dx tensor (empty when
    need_dx is False): a custom op cannot return None."""
    forward_op = torch.library.custom_op(
        f"attrspace::{backend}_subspace_forward", forward_impl, mutates_args=()
    )
    forward_op.register_fake(_forward_fake)
    backward_op = torch.library.custom_op(
        f"attrspace::{backend}_subspace_backward", backward_impl, mutates_args=()
    )
    backward_op.register_fake(_backward_fake)
    return forward_op, backward_op


def _forward_factored_fake(x, weight, bias, U, V, M, scale):
    return reference.empty_forward_outputs(x, weight, V)


def _backward_factored_fake(dy, weight, U, V, M, z, scale, need_dx):
    dx = reference.empty_backward_outputs(dy, weight, U, need_dx)[0]
    return dx, M.new_empty(M.shape)


def factored_custom_ops(backend: str, forward_impl: Callable, backward_impl: Callable):
    """A kernel backend's whole-layer pair as torch.library custom ops
    `attrspace::<backend>_subspace_forward_factored` / `_backward_factored` with their fakes:
    forward_impl(x, weight, bias, U, V, M, scale) -> (y, z) and
    backward_impl(dy, weight, U, V, M, z, scale, need_dx) -> (dx, dM), dx empty (0 rows) when
    need_dx is False (a custom op cannot return None)."""
    forward_op = torch.library.custom_op(
        f"attrspace::{backend}_subspace_forward_factored", forward_impl, mutates_args=()
    )
    forward_op.register_fake(_forward_factored_fake)
    backward_op = torch.library.custom_op(
        f"attrspace::{backend}_subspace_backward_factored", backward_impl, mutates_args=()
    )
    backward_op.register_fake(_backward_factored_fake)
    return forward_op, backward_op
