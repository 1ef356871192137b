"""The three implementations of the randomized SVD's batched steps, behind one contract.

Every step works on a batch of matrices of one shape:
- matmul(a, x, transpose):  a (b, r, c) and x (b, c, l) -> a @ x, or with transpose x (b, r, l) -> a^T @ x
- orthonormalize(y, passes): y (b, r, l), r >= l -> orthonormal basis of range(y), (b, r, l)
- small_svd(core):           core (b, l, l) -> U (b, l, l), S (b, l) descending, V (b, l, l)

`torch` is the reference (plain torch, any device). `triton` runs matmul and orthonormalize as the
kernels of attrspace.kernels.rsvd (on CPU tensors only under TRITON_INTERPRET=1; orthonormalize of more
than rsvd.MAX_COLS = 64 columns runs the torch steps). `native` runs the small
SVD as the batched one-sided Jacobi SVD of attrspace._C (one matrix per CPU task or per GPU thread block).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .orthonormalize import cholesky_qr

BACKENDS = ("torch", "triton", "native")


@dataclass(frozen=True)
class RsvdSteps:
    name: str
    matmul: Callable[[Tensor, Tensor, bool], Tensor]
    orthonormalize: Callable[[Tensor, int], Tensor]
    small_svd: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def torch_matmul(a: Tensor, x: Tensor, transpose: bool) -> Tensor:
    if transpose:
        return a.mT @ x
    # a @ x with a narrow x, computed as (x^T a^T)^T: the CPU GEMM then runs a's long dimension as its
    # wide output side; bmm(a, x) itself ran at 13 GFLOP/s against 31 for this form at (3072, 160) x
    # (160, 24) on the benchmark CPU (one thread). The result is a transposed view.
    return torch.bmm(x.mT, a.mT).mT


def torch_small_svd(core: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(core)
    return u, s, vh.mT


def _triton_matmul(a: Tensor, x: Tensor, transpose: bool) -> Tensor:
    from attrspace.kernels import rsvd

    return rsvd.batched_matmul(a, x, transpose_a=transpose)


def _triton_orthonormalize(y: Tensor, passes: int) -> Tensor:
    from attrspace.kernels import rsvd

    if y.shape[-1] > rsvd.MAX_COLS:  # wider than the kernel holds in registers: the torch steps
        return cholesky_qr(y, passes)
    return rsvd.cholesky_qr(y, min(passes, 3))


def _native_small_svd(core: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from attrspace._svd_native import jacobi_svd

    return jacobi_svd(core)


STEPS = {
    "torch": RsvdSteps("torch", torch_matmul, cholesky_qr, torch_small_svd),
    "triton": RsvdSteps("triton", _triton_matmul, _triton_orthonormalize, torch_small_svd),
    "native": RsvdSteps("native", torch_matmul, cholesky_qr, _native_small_svd),
}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on `device`, else a one-line reason."""
    if name == "torch":
        return None
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"Triton kernels need a CUDA device, or TRITON_INTERPRET=1 for CPU tensors (got {device})"
    if name == "native":
        from attrspace._native import cuda_unavailable_reason, native, native_unavailable_reason

        if device.type not in ("cpu", "cuda"):
            return f"the native Jacobi SVD runs on CPU and CUDA tensors, not on {device}"
        module = native()
        if module is None:
            return native_unavailable_reason()
        if not hasattr(module, "jacobi_svd_cpu"):
            return "attrspace._C was built before the Jacobi SVD existed: rebuild it (pip install -e .)"
        return cuda_unavailable_reason() if device.type == "cuda" else None
    raise ValueError(f"unknown backend {name!r}; choose one of {(*BACKENDS, 'auto')}")


def auto_backend(device: torch.device) -> str:
    """The backend `auto` picks for tensors on `device`: "torch" on every device, for now.

    CPU: the backends differ only in the small SVDs (24 x 24 float64 and 16 x 16 per operator at rank
    16), 2% of the whole decomposition. For 192 such matrices on one core of the benchmark CPU,
    torch.linalg.svd took 6.3 ms (16 x 16, float32) and 20.4 ms (24 x 24, float64), the native Jacobi
    SVD 5.8 and 28.2 ms: no gain worth a dependence on the compiled extension. CUDA: the Triton and CUDA
    kernels have not been timed on a GPU yet (bench/RESULTS.md), so nothing justifies preferring them.
    """
    return "torch"


def select_steps(backend: str, device: torch.device) -> RsvdSteps:
    """The steps of `backend` ("auto", "torch", "triton", "native") for `device`; raises ValueError
    naming why an explicitly requested backend cannot run."""
    if backend == "auto":
        return STEPS[auto_backend(device)]
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"backend {backend!r} cannot run on {device}: {reason}")
    return STEPS[backend]
