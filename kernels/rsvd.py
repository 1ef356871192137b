"""Batched kernels of the randomized SVD (attrspace.linalg, backend "triton").

Two kernels, each batched over every matrix of a shape group in one launch:
- `batched_matmul`: out[b] = A[b] @ X[b] or A[b]^T @ X[b] (the transpose is a stride swap, never a
  copy): the Gram matrices P^T P, Q^T Q and the rank-wide products of the factor form, and every
  product of the dense form.
- `cholesky_qr`: the whole (shifted, mixed-precision) CholeskyQR re-orthonormalisation of Y (b, r, l), up
  to three passes, in ONE launch with one program per matrix: per pass a sweep over Y's rows accumulates
  the l x l Gram matrix in float64, its inverse Cholesky factor W (Y W orthonormal) is built in registers
  by Gram-Schmidt in the metric of the Gram matrix, and a second sweep writes Y W. The numerics of
  attrspace.linalg.orthonormalize (float64 Gram matrix, shifted first pass) without its early stop; the
  torch form needs six launches per pass.
Products are exact (no TF32). A matrix whose Cholesky breaks down (exactly dependent columns) is flagged
and redone by the caller with Householder QR.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import INTERPRET, cdiv, next_power_of_2

DTYPES = (torch.float32, torch.float64)
# Widest Y that cholesky_qr takes: its program keeps two MAX_COLS^2 float64 tiles (the Gram matrix and
# its inverse factor) in registers, 64 KiB per program at 64.
MAX_COLS = 64


def _cholesky_tiles(block_l: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_R, warps) of a cholesky_qr program: enough threads that the two float64 tiles fit in
    registers. ptxas for sm_90 at BLOCK_L = 64 (3 passes): BLOCK_R 64 with 4 warps spills 756 B per
    thread (fp32 Y), 8 warps 192 B; BLOCK_R 32 with 16 warps nothing for fp32 Y, and for fp64 Y
    16 warps (128 registers a thread at most) spill 48 B where 8 warps do not. At BLOCK_L = 32 with
    the barrier between passes, BLOCK_R 64 spills 4 B (fp64 Y, 4 warps) or 12 B (fp32 Y, 8 warps) on
    sm_90; BLOCK_R 32 with 4 warps spills nothing in either dtype."""
    if INTERPRET:
        return 32, 4
    if block_l < 64:
        return 32, 4
    return 32, (16 if dtype == torch.float32 else 8)


# What tests/kernels/test_static.py compiles ahead of time (kernels/_aot.py): (kernel, argument
# types, argument values, constexprs, warps, stages) as the launchers below use them at the largest
# tiles, for a batch of (1024, 64) matrices.
_FLOATS = {"shift_coef": "fp32", "breakdown": "fp32"}
_QR_VALUES = {
    "R": 1024,
    "L": 64,
    "stride_sb": 65536,
    "stride_sr": 64,
    "stride_sl": 1,
    "stride_db": 65536,
    "stride_dr": 64,
    "stride_dl": 1,
}
_BMM_VALUES = {
    "M": 64,
    "K": 1024,
    "L": 64,
    "stride_ab": 65536,
    "stride_am": 1,
    "stride_ak": 64,
    "stride_xb": 65536,
    "stride_xk": 64,
    "stride_xl": 1,
    "stride_ob": 4096,
    "stride_om": 64,
    "stride_ol": 1,
}  # a^T x: the Gram matrix of (1024, 64) matrices
STATIC_CONFIGS = [
    *(
        ("rsvd:_cholesky_qr_kernel",
         {"src_ptr": f"*{t}", "dst_ptr": f"*{t}", "broke_ptr": "*i32", **_FLOATS}, _QR_VALUES,
         {"PASSES": 3, "BLOCK_R": _cholesky_tiles(bl, dt)[0], "BLOCK_L": bl},
         _cholesky_tiles(bl, dt)[1], 1)
        for t, dt in (("fp32", torch.float32), ("fp64", torch.float64)) for bl in (32, 64)
    ),
    *(
        ("rsvd:_bmm_kernel", {"a_ptr": f"*{t}", "x_ptr": f"*{t}", "out_ptr": f"*{t}"},
         _BMM_VALUES, {"BLOCK_M": bm, "BLOCK_K": 32, "BLOCK_L": 64}, 4, 3)
        for t, bm in (("fp32", 64), ("fp64", 32))
    ),
]  # fmt: skip


@triton.jit
def _bmm_kernel(
    a_ptr, x_ptr, out_ptr, M, K, L,
    stride_ab, stride_am, stride_ak,
    stride_xb, stride_xk, stride_xl,
    stride_ob, stride_om, stride_ol,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rl = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    rk = tl.arange(0, BLOCK_K)
    a_base = a_ptr + b * stride_ab
    x_base = x_ptr + b * stride_xb
    acc = tl.zeros((BLOCK_M, BLOCK_L), dtype=out_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(
            a_base + rm[:, None] * stride_am + kk[None, :] * stride_ak,
            mask=(rm[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        x = tl.load(
            x_base + kk[:, None] * stride_xk + rl[None, :] * stride_xl,
            mask=(kk[:, None] < K) & (rl[None, :] < L),
            other=0.0,
        )
        acc += tl.dot(a, x, input_precision="ieee")
    tl.store(
        out_ptr + b * stride_ob + rm[:, None] * stride_om + rl[None, :] * stride_ol,
        acc,
        mask=(rm[:, None] < M) & (rl[None, :] < L),
    )


@triton.jit
def _cholesky_qr_kernel(
    src_ptr, dst_ptr, broke_ptr, R, L,
    stride_sb, stride_sr, stride_sl,
    stride_db, stride_dr, stride_dl,
    shift_coef, breakdown,
    PASSES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    dtype = dst_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_L)
    local_rows = tl.arange(0, BLOCK_R)
    col_ok = cols < L
    eye = (cols[:, None] == cols[None, :]) & col_ok[:, None]
    src = src_ptr + b * stride_sb
    dst = dst_ptr + b * stride_db
    broke = tl.sum(tl.zeros((BLOCK_L,), dtype=tl.int32))  # a 0-d int32, carried through the loops
    for p in tl.static_range(PASSES):
        # Pass 0 reads the input; later passes re-read (and overwrite) the output row block by row block.
        if p == 0:
            base, s_r, s_l = src, stride_sr, stride_sl
        else:
            base, s_r, s_l = dst, stride_dr, stride_dl
        gram = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float64)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + local_rows
            y = tl.load(
                base + rows[:, None] * s_r + cols[None, :] * s_l,
                mask=(rows[:, None] < R) & col_ok[None, :],
                other=0.0,
            )
            y = y.to(tl.float64)
            gram += tl.dot(tl.trans(y), y, input_precision="ieee")
        diag = tl.sum(tl.where(eye, gram, 0.0), axis=1)
        if p == 0:
            # Shifted CholeskyQR: the first pass cannot break down for a numerically full-rank Y.
            gram += tl.where(eye, shift_coef * tl.sum(diag), 0.0)
        # w: upper triangular with Y w orthonormal (w = R^-1 for the Cholesky factor R of gram),
        # column j made G-orthogonal to the columns before it and G-normalised (right-looking).
        w = tl.where(eye, 1.0, 0.0).to(tl.float64)
        for j in range(0, L):
            at_j = cols == j
            w_j = tl.sum(tl.where(at_j[None, :], w, 0.0), axis=1)
            g_wj = tl.sum(gram * w_j[None, :], axis=1)
            norm2 = tl.sum(w_j * g_wj)
            pivot_floor = breakdown * tl.sum(tl.where(at_j, diag, 0.0))
            ok = norm2 > pivot_floor
            broke = tl.where(ok, broke, 1)
            inv = tl.where(ok, 1.0 / tl.sqrt(tl.where(ok, norm2, 1.0)), 0.0)
            w_j = w_j * inv
            g_wj = g_wj * inv
            coef = tl.sum(w * g_wj[:, None], axis=0)
            later = cols[None, :] > j
            w = tl.where(later, w - w_j[:, None] * coef[None, :], w)
            w = tl.where(at_j[None, :], w_j[:, None], w)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + local_rows
            mask = (rows[:, None] < R) & col_ok[None, :]
            y = tl.load(base + rows[:, None] * s_r + cols[None, :] * s_l, mask=mask, other=0.0)
            q = tl.dot(y, w.to(dtype), input_precision="ieee")
            tl.store(dst + rows[:, None] * stride_dr + cols[None, :] * stride_dl, q, mask=mask)
        if p < PASSES - 1:
            # The next pass's Gram sweep reads dst rows that other threads of this program stored in
            # this pass's last row blocks: their stores must be visible first (bar.sync orders global
            # memory among a block's threads). Without it only a row loop of two or more sweeps
            # hid the race, by the barriers inside tl.dot of later row blocks.
            tl.debug_barrier()
    tl.store(broke_ptr + b, broke)


def _pow2_at_least_16(n: int) -> int:
    return max(16, next_power_of_2(n))


def _check_batch(name: str, t: Tensor) -> None:
    if t.ndim != 3:
        raise ValueError(f"{name} must have shape (b, rows, cols), got {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")


def batched_matmul(a: Tensor, x: Tensor, transpose_a: bool = False) -> Tensor:
    """a (b, M, K) @ x (b, K, L), or a (b, K, M)^T @ x when transpose_a -> (b, M, L) in a's dtype.

    Any strides (views from slicing or .mT are read in place); a and x share dtype and device.
    """
    _check_batch("a", a)
    _check_batch("x", x)
    if x.dtype != a.dtype or x.device != a.device:
        raise ValueError(
            f"a and x must share dtype and device, got {a.dtype}/{a.device} and {x.dtype}/{x.device}"
        )
    sb, sm, sk = a.stride()
    batch, m, k = a.shape
    if transpose_a:
        m, k, sm, sk = k, m, sk, sm
    if x.shape[0] != batch or x.shape[1] != k:
        raise ValueError(
            f"shapes do not chain: a {tuple(a.shape)} (transpose={transpose_a}), x {tuple(x.shape)}"
        )
    cols = x.shape[2]
    out = torch.empty((batch, m, cols), dtype=a.dtype, device=a.device)
    if batch == 0:
        return out
    block_l = min(_pow2_at_least_16(cols), 64)
    block_m, block_k = (32, 32) if INTERPRET or a.dtype == torch.float64 else (64, 32)
    grid = (batch, cdiv(m, block_m), cdiv(cols, block_l))
    _bmm_kernel[grid](
        a, x, out, m, k, cols,
        sb, sm, sk,
        *x.stride(),
        *out.stride(),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_L=block_l,
    )  # fmt: skip
    return out


def cholesky_qr(y: Tensor, passes: int) -> Tensor:
    """Orthonormal basis of range(y): y (b, r, l), r >= l, l <= MAX_COLS -> (b, r, l), y untouched.

    `passes` CholeskyQR passes (1 to 3), the first shifted (see attrspace.linalg.orthonormalize).
    Matrices whose Cholesky broke down are redone with torch's Householder QR.
    """
    _check_batch("y", y)
    batch, r, cols = y.shape
    if not 1 <= passes <= 3:
        raise ValueError(f"passes must be 1, 2 or 3, got {passes}")
    if cols > MAX_COLS or r < cols:
        raise ValueError(f"y must be tall with at most {MAX_COLS} columns, got {tuple(y.shape)}")
    out = torch.empty((batch, r, cols), dtype=y.dtype, device=y.device)
    broke = torch.zeros((batch,), dtype=torch.int32, device=y.device)
    if batch == 0:
        return out
    eps = torch.finfo(torch.float64).eps
    shift_coef = 11.0 * (r * cols + cols * (cols + 1)) * eps
    block_l = _pow2_at_least_16(cols)
    block_r, warps = _cholesky_tiles(block_l, y.dtype)
    _cholesky_qr_kernel[(batch,)](
        y, out, broke, r, cols,
        *y.stride(),
        *out.stride(),
        shift_coef, 64 * eps,
        PASSES=passes, BLOCK_R=block_r, BLOCK_L=block_l, num_warps=warps,
    )  # fmt: skip
    failed = broke != 0
    if bool(failed.any()):
        out[failed] = torch.linalg.qr(y[failed]).Q
    return out
