"""Adapter from torch tensors to the batched Jacobi SVD of attrspace._C (raw addresses and sizes).

The native functions take each matrix column-major; a (b, rows, cols) tensor's transpose made
contiguous is exactly that layout, so one copy in and views out suffice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attrspace.backends.native import cuda_unavailable_reason, native, native_unavailable_reason

# Jacobi converges quadratically once the columns are nearly orthogonal: 6-10 sweeps are typical at
# l <= 64; a matrix still rotating after 40 sweeps is reported, not returned half-done.
MAX_SWEEPS = 40


def jacobi_svd(a: Tensor, threads: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of a batch of small matrices by the native one-sided Jacobi method.

    a: (b, rows, cols) float32 or float64 on the CPU or a CUDA device, min(rows, cols) <= 256 (a wide
    matrix is decomposed through its transpose). threads: CPU threads; 0 picks
    min(torch.get_num_threads(), b // 64), at least 1 (a thread costs about as much to start as a few
    dozen small matrices take to decompose).
    Returns U (b, rows, k), S (b, k) descending, V (b, cols, k), k = min(rows, cols), with
    a = U diag(S) V^T and orthonormal columns in U and V (completed where a singular value is zero).
    Raises RuntimeError when attrspace._C is missing or a matrix did not converge.
    """
    if a.ndim != 3:
        raise ValueError(f"a must have shape (b, rows, cols), got {tuple(a.shape)}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"a must be float32 or float64, got {a.dtype}")
    if a.shape[-2] < a.shape[-1]:
        u, s, v = jacobi_svd(a.mT, threads)
        return v, s, u
    module = native()
    if module is None:
        raise RuntimeError(f"the native Jacobi SVD is unavailable: {native_unavailable_reason()}")
    batch, rows, cols = a.shape
    # (b, cols, rows): each matrix column-major. Always a copy: the call overwrites it, and contiguous()
    # would hand back the caller's own storage when `a` is a transposed view.
    work = a.mT.clone(memory_format=torch.contiguous_format)
    u = torch.empty_like(work)
    s = torch.empty((batch, cols), dtype=a.dtype, device=a.device)
    v = torch.empty((batch, cols, cols), dtype=a.dtype, device=a.device)
    info = torch.empty((batch,), dtype=torch.int32, device=a.device)
    args = (
        work.data_ptr(),
        u.data_ptr(),
        s.data_ptr(),
        v.data_ptr(),
        info.data_ptr(),
        batch,
        rows,
        cols,
        a.dtype == torch.float64,
        MAX_SWEEPS,
    )
    if a.device.type == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"the CUDA Jacobi SVD is unavailable: {reason}")
        with torch.cuda.device(a.device):
            module.jacobi_svd_cuda(*args, torch.cuda.current_stream(a.device).cuda_stream)
    elif a.device.type == "cpu":
        if threads <= 0:
            threads = max(1, min(torch.get_num_threads(), batch // 64))
        module.jacobi_svd_cpu(*args, threads)
    else:
        raise ValueError(f"the native Jacobi SVD runs on CPU and CUDA tensors, not on {a.device}")
    failed = (info < 0).nonzero()
    if failed.numel() > 0:
        raise RuntimeError(
            f"Jacobi SVD did not converge in {MAX_SWEEPS} sweeps for matrix {int(failed[0, 0])} "
            f"of the batch ({failed.numel()} of {batch})"
        )
    return u.mT, s, v.mT
