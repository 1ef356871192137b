"""The adapted layer as a function, with its autograd Function.

    y = x W^T + b + s x V M^T U^T          W, b, U, V frozen; only M (and x) receive gradients

Gradients, with z = x V (T, K) and g = dy U (T, K):
    dx = dy W + s g M V^T
    dM = s g^T z
So backward needs z, T*K numbers, and never x (T*d_in): the Function saves z and the frozen tensors (which
are parameters and buffers, not activations). Standard LoRA must keep x for dA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attrspace import backends
from attrspace.adapters.reference import accum_dtype, grad_m

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class SubspaceLinearFn(torch.autograd.Function):
    """Forward and exact backward of the frozen-basis adapter on one backend.

    The backend is chosen once, by the caller, and used for both passes so their numerics never mix.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, U, V, M, scale: float, backend: str):
        impl = backends.implementation(backend)
        d_in, d_out = weight.shape[1], weight.shape[0]
        lead = x.shape[:-1]
        # (each skipped no-op call is host time saved on every step: bench/bench_host.py)
        x2 = x if x.ndim == 2 and x.is_contiguous() else x.reshape(-1, d_in).contiguous()
        acc = accum_dtype(x.dtype)
        M = M if M.dtype == acc else M.to(acc)
        # A backend with whole-layer entry points forms P (and Q, and reduces dM) inside its launches.
        ctx.factored = hasattr(impl, "forward_factored")
        if ctx.factored:
            y, z = impl.forward_factored(x2, weight, bias, U, V, M, scale)
        else:
            P = torch.mm(U if U.dtype == acc else U.to(acc), M).mul_(scale)
            y, z = impl.forward(x2, weight, bias, V, P)
        ctx.save_for_backward(z, weight, U, V, M)
        ctx.scale = scale
        ctx.backend = backend
        ctx.x_shape = x.shape
        return y if x2 is x else y.reshape(*lead, d_out)

    @staticmethod
    def backward(ctx, dy):
        z, weight, U, V, M = ctx.saved_tensors
        need_dx, need_dm = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
        two_d = dy.ndim == 2 and dy.is_contiguous()
        dy2 = dy if two_d else dy.reshape(-1, weight.shape[0]).contiguous()
        acc = accum_dtype(dy.dtype)
        dx = dm = None
        if ctx.factored:
            impl = backends.implementation(ctx.backend)
            dx, dm = impl.backward_factored(dy2, weight, U, V, M, z, ctx.scale, need_dx)
            if need_dx and not two_d:
                dx = dx.reshape(ctx.x_shape)
            return dx, None, None, None, None, dm if need_dm else None, None, None
        if need_dx:
            Q = torch.mm(V if V.dtype == acc else V.to(acc), M.t()).mul_(ctx.scale)
            dx, g = backends.implementation(ctx.backend).backward(dy2, weight, U, Q, True)
            dx = dx if two_d else dx.reshape(ctx.x_shape)
        elif need_dm:
            g = dy2.to(acc) @ U.to(acc)
        if need_dm:
            dm = grad_m(g, z, ctx.scale)
        return dx, None, None, None, None, dm, None, None


def _well_formed(
    x: Tensor, weight: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, M: Tensor
) -> bool:
    """The whole of _check's conditions as one expression, for the call that passes them all: the
    check runs on every forward, and naming what failed costs host time only when something did
    (bench/bench_host.py)."""
    if not isinstance(x, Tensor) or x.ndim == 0:
        return False
    dtype, device = x.dtype, x.device
    d_out, d_in = weight.shape
    K = M.shape[0] if M.ndim == 2 else -1
    return (
        x.shape[-1] == d_in
        and U.shape == (d_out, K)
        and V.shape == (d_in, K)
        and M.shape == (K, K)
        and dtype in _FLOAT_DTYPES
        and weight.dtype is dtype
        and U.dtype is dtype
        and V.dtype is dtype
        and weight.device == device
        and U.device == device
        and V.device == device
        and M.device == device
        and not weight.requires_grad
        and (
            bias is None
            or (
                bias.shape == (d_out,)
                and bias.dtype is dtype
                and bias.device == device
                and not bias.requires_grad
            )
        )
    )


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, M: Tensor) -> None:
    if _well_formed(x, weight, bias, U, V, M):
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    d_out, d_in = weight.shape
    K = M.shape[0] if M.ndim == 2 else -1
    expected = {"U": (d_out, K), "V": (d_in, K), "M": (K, K)}
    for name, t in (("U", U), ("V", V), ("M", M)):
        if t.ndim != 2 or tuple(t.shape) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} for a {d_in}->{d_out} layer with K={K}, "
                f"got {tuple(t.shape)}"
            )
    if x.ndim == 0 or x.shape[-1] != d_in:
        raise ValueError(f"x must have shape (..., {d_in}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    named = [("weight", weight), ("U", U), ("V", V)] + (
        [("bias", bias)] if bias is not None else []
    )
    for name, t in named:
        if t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}; cast the layer or the input")
    for name, t in [*named, ("M", M)]:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError(
            "the base weight and bias of a subspace layer are frozen, but requires_grad is True; "
            "call .requires_grad_(False) on them (only M trains). Under FSDP1 "
            "(FullyShardedDataParallel) the frozen weight becomes a view of a trainable flat "
            "parameter: shard with FSDP2 instead (attrspace.distributed.fully_shard_model)"
        )


def subspace_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    U: Tensor,
    V: Tensor,
    M: Tensor,
    scale: float = 1.0,
    backend: str = "auto",
) -> tuple[Tensor, str]:
    """y = x W^T + b + scale * x V M^T U^T, and the name of the backend that ran it.

    Args:
        x: (..., d_in), float32 / float16 / bfloat16 (float64 on the torch backend).
        weight: (d_out, d_in) frozen, same dtype and device as x. bias: (d_out,) or None.
        U: (d_out, K), V: (d_in, K) frozen bases, same dtype as x. M: (K, K), any float dtype.
        scale: the adapter scale s. backend: "auto", "torch", "triton" or "cuda".
    Under autocast, x, weight, bias, U and V are cast to the autocast dtype first (as nn.Linear is).
    Raises ValueError / TypeError naming the argument on a wrong shape, dtype or device, and ValueError
    with every reason when an explicitly requested backend cannot run the inputs.
    """
    device_type = x.device.type
    # Devices without autocast (meta, where whole-model memory is counted) skip both autocast steps.
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(
        device_type
    )
    if autocast:
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, U, V = (t.to(dtype) for t in (x, weight, U, V))
        bias = bias.to(dtype) if bias is not None else None
    _check(x, weight, bias, U, V, M)
    if backend not in _PRELOADED and not torch.compiler.is_compiling():
        backends.preload(backend)  # imports; select() re-reads ATTRSPACE_BACKEND on every call
        _PRELOADED.add(backend)
    name = backends.select(backend, x, weight, M.shape[0])
    if not autocast:
        return _run(x, weight, bias, U, V, M, float(scale), name), name
    # autocast must not re-cast inside the passes; entering a context costs host time, so only then
    with torch.autocast(device_type, enabled=False):
        return _run(x, weight, bias, U, V, M, float(scale), name), name


def _run(x, weight, bias, U, V, M, scale: float, name: str) -> Tensor:
    if name == "torch" and _few_tokens_in_fp32(x, weight, M):
        return _composed(x, weight, bias, U, V, M, scale)
    return SubspaceLinearFn.apply(x, weight, bias, U, V, M, scale, name)


def _few_tokens_in_fp32(x: Tensor, weight: Tensor, M: Tensor) -> bool:
    """fp32 / fp64 with fewer tokens than the fold's cost pays for: T (d_in + d_out) < d_in d_out."""
    if x.dtype not in (torch.float32, torch.float64) or M.dtype != x.dtype:
        return False
    d_out, d_in = weight.shape
    return x.numel() // d_in * (d_in + d_out) < d_in * d_out


def _composed(x, weight, bias, U, V, M, scale: float) -> Tensor:
    """The layer from built-in differentiable ops, for the torch backend in fp32 / fp64 at few
    tokens: no Python autograd.Function, whose apply and Python backward cost more host time than
    the arithmetic (bench/bench_host.py). Autograd still saves only z = x V and the frozen tensors:
    x V saves V (x's gradient needs only V), z M^T saves z and M, and the products with the frozen
    W and U save W and U. The two fp32 roundings (base, then adapter) cost ~1e-7 relative."""
    base, h = F.linear(x, weight, bias), F.linear(torch.matmul(x, V), M)
    if x.ndim == 2:
        return torch.addmm(base, h, U.t(), alpha=scale)
    lead = x.shape[:-1]
    return torch.addmm(base.flatten(0, -2), h.flatten(0, -2), U.t(), alpha=scale).unflatten(0, lead)


_PRELOADED: set[str] = set()
