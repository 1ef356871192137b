"""Fused kernels of the adapted layer: y and z = x V in one launch, dx and g = dy U in another.

Both passes are one computation on different operands (docs/design.md §2):
    forward:  out = x W^T + b + z P^T,   side = z = x V    A = x,  B = W^T, C = V, E = P, R = d_in
    backward: out = dy W + g Q^T,        side = g = dy U   A = dy, B = W,   C = U, E = Q, R = d_out
that is out = A B + bias + side E^T and side = A C, with A (T, R), B (R, N), C (R, K), E (N, K) fp32.
Every sum is accumulated in fp32 and `out` is rounded once. side is stored in its output dtype (z in the
input dtype, g in fp32) and read back from there by the epilogue: in fp16 / bf16 the adapter term uses z
rounded once (what the backward saves anyway), and its operands have at most 10 mantissa bits on tensor
cores in any case (ADAPTER_PRECISIONS).

One launch does two kinds of work, split into tickets:
- a side ticket per row block computes side = A C over the whole R loop, stores it and sets the row
  block's ready flag;
- an output ticket per (row block, column tile) computes A B over the R loop, waits for its row
  block's flag, then adds side E^T (and the bias) to its fp32 accumulator and rounds once.
(With P / Q formed in the launch, factor tickets come first: E = s F M' column tile by column tile.)
Why: every output tile needs the complete side rows (a reduction over all of R) before its epilogue.
Recomputing them in every output tile repeats K_PAD / BLOCK_N of the main work (25-50%). One program
per row block sweeping every column tile repeats nothing but leaves T / BLOCK_M programs (86 at
T = 8 x 1369 and BLOCK_M = 128, fewer than the 132 SMs of an H100) and re-reads each program's x rows
from L2 at every tile (1 MiB per row block at d_in = 4096: more than L2 holds for 132 programs). With the
flags the launch is an ordinary grouped GEMM over the virtual weight [C^T; B^T] of K_PAD + N columns:
no repeated work, full occupancy, and a group's x rows come from HBM once and from L2 afterwards.
The grid is persistent: min(SMs x PROGRAMS_PER_SM, tickets) programs (PROGRAMS_PER_SM per config in
_config: as many as fit on one SM on both sm_80 and sm_90a), each taking tickets from an atomic
counter and working them one after another until they run out: a launch starts one wave of programs,
not one block per tile (1130 tickets in the forward at T = 8 x 1369, 1024 -> 3072 with 128 x 256
tiles). The g-only backward (no output columns, at most T / BLOCK_M tickets) runs one program per
ticket.
Deadlock freedom: a ticket's role comes from its number, not from a program id (CUDA does not promise
to start blocks in id order). A group's side tickets are lower than its output tickets, so output work
waits only on work whose ticket was taken earlier, by a program that is running; that program never
waits on a later ticket, because it takes its next ticket only after finishing the current one. The
wait comes after the output tile's own main loop, and a side ticket is K_PAD / BLOCK_N (at most half)
of an output ticket's work, so the wait is usually over. The full argument is beside _fused_kernel.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from ._config import (
    AUTOTUNE_KEY,
    CONFIGS,
    INTERPRET,
    MIN_BLOCK_M,
    MIN_BLOCK_N,
    TMA_MODE,
    cdiv,
    next_power_of_2,
    prune_configs,
)

if INTERPRET and not hasattr(tl.condition, "__bool__"):
    # Triton's interpreter (3.6, 3.7) runs `while tl.condition(c, ...)` as plain Python, where the
    # wrapper object is always true: the persistent loop would never end. Its truth is c's.
    tl.condition.__bool__ = lambda self: bool(self.condition)

MAX_RANK = 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# How the adapter term side E^T is multiplied (the sum is fp32 in every case):
#   "ieee":  fp32 operands, exact fp32 products (the fp32 path; matches the reference to ~1e-5).
#   "tf32":  fp32 operands on tensor cores with 10-bit mantissas (fp16 inputs: the mantissa of fp16, so
#            reading the rounded z loses nothing more, and the exponent range of fp32, so a small P or Q
#            does not sink into fp16 subnormals).
#   "input": operands rounded to the input dtype (bf16 inputs: the same 8-bit exponent as fp32, so only the
#            mantissa rounds, like the base term's x and W; a full-rate bf16 MMA where tf32 runs at half
#            rate, which is 6% of the forward tile at K = 64, d_in = 1024).
ADAPTER_PRECISIONS = ("ieee", "tf32", "input")
_DEFAULT_ADAPTER_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "input"}


@triton.jit
def _tile_product(
    a_ptr, b_ptr, rows, cols, col_limit, R,
    stride_at, stride_ar, stride_br, stride_bc,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """fp32 (BLOCK_M, BLOCK_C) tile of A B. rows: (BLOCK_M,) int64 in range; cols: (BLOCK_C,) int32."""
    offs_r = tl.arange(0, BLOCK_R)
    a_ptrs = a_ptr + rows[:, None] * stride_at + offs_r[None, :] * stride_ar
    b_ptrs = b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bc
    col_ok = cols[None, :] < col_limit
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = offs_r < R - r0
        a = tl.load(a_ptrs, mask=r_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=r_ok[:, None] & col_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_R * stride_ar
        b_ptrs += BLOCK_R * stride_br
    return acc


@triton.jit
def _tile_product_tma(
    a_desc, b_desc, row0, col0, R,
    B_ROWS_ARE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """_tile_product through tensor descriptors (TMA, sm_90): the copy engine fills out-of-range rows,
    columns and the R tail with zeros, so no masks and no wrapped rows. B_ROWS_ARE_N: b_desc holds
    B^T row-major (the forward's W), whose tile is transposed in shared memory for free."""
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        a = a_desc.load([row0, r0])
        if B_ROWS_ARE_N:
            b = b_desc.load([col0, r0]).T
        else:
            b = b_desc.load([r0, col0])
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _side_program(
    a_ptr, c_ptr, a_desc, c_desc, side_ptr, zs_ptr, part_ptr, dm_ptr, sched_ptr, ready_ptr,
    row_block, T, R, K, n_row_blocks, scale,
    stride_at, stride_ar, stride_cr, stride_ck,
    K_PAD: tl.constexpr, GRAD_M: tl.constexpr, PRECISION: tl.constexpr,
    DM_PRECISION: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rows = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, K_PAD)
    if TMA:
        side = _tile_product_tma(
            a_desc, c_desc, row_block * BLOCK_M, 0, R, False, BLOCK_M, K_PAD, BLOCK_R, PRECISION
        )
    else:
        # Rows past T wrap onto valid rows so the loop needs no row mask; they are not stored.
        side = _tile_product(
            a_ptr, c_ptr, rows % T, offs_k, K, R, stride_at, stride_ar, stride_cr, stride_ck,
            BLOCK_M, K_PAD, BLOCK_R, PRECISION,
        )  # fmt: skip
    mask = (rows[:, None] < T) & (offs_k[None, :] < K)
    tl.store(
        side_ptr + rows[:, None] * K + offs_k[None, :],
        side.to(side_ptr.dtype.element_ty),
        mask=mask,
    )
    if GRAD_M:
        _grad_m_part(
            side_ptr, zs_ptr, part_ptr, dm_ptr, sched_ptr, row_block, T, K, n_row_blocks, scale,
            K_PAD, BLOCK_M, DM_PRECISION,
        )  # fmt: skip
    # Every thread's stores must be done before the one thread that sets the flag releases them.
    tl.debug_barrier()
    tl.atomic_xchg(ready_ptr + row_block, 1, sem="release")


@triton.jit
def _grad_m_part(
    side_ptr, zs_ptr, part_ptr, dm_ptr, sched_ptr, row_block, T, K, n_row_blocks, scale,
    K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, DM_PRECISION: tl.constexpr,
):  # fmt: skip
    """dM = s g^T z inside the backward: this row block's g^T z goes to its slot of part_ptr; the row
    block that finishes last sums every slot in row-block order (the same order whoever is last, so
    the result is deterministic) and writes dM. sched_ptr[2] counts finished row blocks; acq_rel
    makes the slots stored before each increment visible to the last.
    g^T z is summed DM_ROWS tokens at a time, g read back (transposed) from side_ptr, this program's
    own stores, after the barrier. DM_PRECISION (_dm_precision) is "ieee" on sm_90 and in fp32:
    exact fp32 products on the FMA units, as the torch and CUDA backends' dM, a few registers at a
    time (the whole tile at once spills); a TF32 MMA here, over the whole tile or in row chunks,
    makes Triton 3.6 serialise every wgmma of the kernel (ptxas C7515, bench/RESULTS.md). "tf32" on sm_80, where mma.sync has no such pipeline to lose, as one
    product over the whole tile (exact products, or TF32 in row chunks, spill its bf16 128 x 128
    backward)."""
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < K
    tl.debug_barrier()  # every thread's g stores of this tile are done
    DM_ROWS: tl.constexpr = 16 if DM_PRECISION == "ieee" else BLOCK_M
    part = tl.zeros((K_PAD, K_PAD), dtype=tl.float32)
    for r0 in range(0, BLOCK_M, DM_ROWS):
        rows = row_block.to(tl.int64) * BLOCK_M + r0 + tl.arange(0, DM_ROWS)
        ok = (rows[:, None] < T) & k_ok[None, :]  # rows past T count as zeros
        g_t = tl.load(side_ptr + offs_k[:, None] + rows[None, :] * K, mask=tl.trans(ok), other=0.0)
        z = tl.load(zs_ptr + rows[:, None] * K + offs_k[None, :], mask=ok, other=0.0)
        part = tl.dot(g_t, z.to(tl.float32), part, input_precision=DM_PRECISION)
    square = offs_k[:, None] * K_PAD + offs_k[None, :]
    tl.store(part_ptr + row_block.to(tl.int64) * K_PAD * K_PAD + square, part)
    tl.debug_barrier()
    if tl.atomic_add(sched_ptr + 2, 1, sem="acq_rel") == n_row_blocks - 1:
        total = tl.zeros((K_PAD, K_PAD), dtype=tl.float32)
        for rb in range(0, n_row_blocks):
            total += tl.load(part_ptr + rb * K_PAD * K_PAD + square)
        tl.store(
            dm_ptr + offs_k[:, None] * K + offs_k[None, :],
            total * scale,
            mask=k_ok[:, None] & k_ok[None, :],
        )


@triton.jit
def _factor_program(
    f_ptr, m_ptr, e_ptr, col_ready_ptr, col_tile, N, K, scale,
    stride_fn, stride_fk, stride_mk, stride_mj,
    K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, FACTOR_ROWS: tl.constexpr = 16,
):  # fmt: skip
    """E = s F M' for one column tile (F = U, M' = M: P; F = V, M' = M^T by strides: Q), in fp32
    with exact products, then its column flag is released."""
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < K
    m = tl.load(
        m_ptr + offs_k[:, None] * stride_mk + offs_k[None, :] * stride_mj,
        mask=k_ok[:, None] & k_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    # 16 rows at a time: exact fp32 products run on the FMA units, whose operands and accumulator
    # all sit in registers (a whole 256-row tile at once spills hundreds of bytes per thread).
    for n0 in tl.static_range(0, BLOCK_N, FACTOR_ROWS):
        cols = col_tile * BLOCK_N + n0 + tl.arange(0, FACTOR_ROWS)
        ok = (cols[:, None] < N) & k_ok[None, :]
        f = tl.load(
            f_ptr + cols[:, None] * stride_fn + offs_k[None, :] * stride_fk, mask=ok, other=0.0
        )
        e = tl.dot(f.to(tl.float32), m, input_precision="ieee") * scale
        tl.store(e_ptr + cols[:, None] * K + offs_k[None, :], e, mask=ok)
    tl.debug_barrier()
    tl.atomic_xchg(col_ready_ptr + col_tile, 1, sem="release")


@triton.jit
def _output_program(
    a_ptr, b_ptr, a_desc, b_desc, e_ptr, bias_ptr, out_ptr, side_ptr, ready_ptr, col_ready_ptr,
    row_block, col_tile, T, R, N, K,
    stride_at, stride_ar, stride_br, stride_bn, stride_en, stride_ek, stride_bias,
    K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FACTOR: tl.constexpr, PRECISION: tl.constexpr,
    ADAPTER_PRECISION: tl.constexpr, TMA: tl.constexpr, B_ROWS_ARE_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rows = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows % T
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, K_PAD)
    if TMA:
        acc = _tile_product_tma(
            a_desc, b_desc, row_block * BLOCK_M, col_tile * BLOCK_N, R, B_ROWS_ARE_N,
            BLOCK_M, BLOCK_N, BLOCK_R, PRECISION,
        )  # fmt: skip
    else:
        acc = _tile_product(
            a_ptr, b_ptr, in_rows, cols, N, R, stride_at, stride_ar, stride_br, stride_bn,
            BLOCK_M, BLOCK_N, BLOCK_R, PRECISION,
        )  # fmt: skip
    # Wait for this row block's side program (acquire: its stores are visible after the flag).
    while tl.atomic_add(ready_ptr + row_block, 0, sem="acquire") == 0:
        pass
    if FACTOR:  # and for its column tile's factor program (E = P or Q)
        while tl.atomic_add(col_ready_ptr + col_tile, 0, sem="acquire") == 0:
            pass
    tl.debug_barrier()
    k_ok = offs_k < K
    side = tl.load(side_ptr + in_rows[:, None] * K + offs_k[None, :], mask=k_ok[None, :], other=0.0)
    side = side.to(tl.float32)
    e_t = tl.load(
        e_ptr + offs_k[:, None] * stride_ek + cols[None, :] * stride_en,
        mask=k_ok[:, None] & (cols[None, :] < N),
        other=0.0,
    )
    if ADAPTER_PRECISION == "input":
        in_dtype = out_ptr.dtype.element_ty
        acc = tl.dot(side.to(in_dtype), e_t.to(in_dtype), acc)
    else:
        acc = tl.dot(side, e_t, acc, input_precision=ADAPTER_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias, mask=cols < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    mask = (rows[:, None] < T) & (cols[None, :] < N)
    tl.store(
        out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask
    )


_INTERPRETED = tl.constexpr(INTERPRET)


@triton.jit
def _fence_proxy_async(x):
    """fence.proxy.async.shared::cta in every thread. The next ticket's TMA copies (async proxy)
    may land in shared memory that this ticket's epilogue wrote or read with ordinary instructions
    (generic proxy); a barrier alone does not order the two proxies, each accessing thread's fence
    before the barrier does (the next ticket's atomic broadcasts through shared memory behind one)."""
    tl.inline_asm_elementwise(
        "fence.proxy.async.shared::cta;\nmov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
        is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _run_ticket(
    ticket, a_ptr, b_ptr, c_ptr, e_ptr, f_ptr, m_ptr, bias_ptr, out_ptr, side_ptr, zs_ptr,
    part_ptr, dm_ptr, sched_ptr, a_desc, b_desc, c_desc,
    T, R, N, K, scale, n_row_blocks, n_col_tiles, n_factor,
    stride_at, stride_ar, stride_br, stride_bn, stride_cr, stride_ck, stride_en, stride_ek,
    stride_fn, stride_fk, stride_mk, stride_mj, stride_bias,
    K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FACTOR: tl.constexpr, GRAD_M: tl.constexpr,
    PRECISION: tl.constexpr, ADAPTER_PRECISION: tl.constexpr, DM_PRECISION: tl.constexpr,
    TMA: tl.constexpr, B_ROWS_ARE_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """The work of one ticket (0 <= ticket < the launch's ticket count): its role and tile follow
    from the ticket alone (see _fused_kernel)."""
    flags_ptr = sched_ptr + 3
    col_flags_ptr = flags_ptr + n_row_blocks
    if ticket < n_factor:
        _factor_program(
            f_ptr, m_ptr, e_ptr, col_flags_ptr, ticket, N, K, scale,
            stride_fn, stride_fk, stride_mk, stride_mj, K_PAD, BLOCK_N,
        )  # fmt: skip
    else:
        work = ticket - n_factor
        group_size = GROUP_M * (1 + n_col_tiles)
        group = work // group_size
        first_row_block = group * GROUP_M
        rows_in_group = tl.minimum(n_row_blocks - first_row_block, GROUP_M)
        local = work - group * group_size
        if local < rows_in_group:
            _side_program(
                a_ptr, c_ptr, a_desc, c_desc, side_ptr, zs_ptr, part_ptr, dm_ptr, sched_ptr,
                flags_ptr, first_row_block + local, T, R, K, n_row_blocks, scale,
                stride_at, stride_ar, stride_cr, stride_ck,
                K_PAD, GRAD_M, PRECISION, DM_PRECISION, TMA, BLOCK_M, BLOCK_R,
            )  # fmt: skip
        else:
            tile = local - rows_in_group
            _output_program(
                a_ptr, b_ptr, a_desc, b_desc, e_ptr, bias_ptr, out_ptr, side_ptr, flags_ptr,
                col_flags_ptr, first_row_block + tile % rows_in_group, tile // rows_in_group,
                T, R, N, K,
                stride_at, stride_ar, stride_br, stride_bn, stride_en, stride_ek, stride_bias,
                K_PAD, HAS_BIAS, FACTOR, PRECISION, ADAPTER_PRECISION, TMA, B_ROWS_ARE_N,
                BLOCK_M, BLOCK_N, BLOCK_R,
            )  # fmt: skip


@triton.autotune(
    configs=CONFIGS,
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
    reset_to_zero=["sched_ptr"],  # a timing run cut short would leave tickets taken
)
@triton.jit
def _fused_kernel(
    a_ptr, b_ptr, c_ptr, e_ptr, f_ptr, m_ptr, bias_ptr, out_ptr, side_ptr, zs_ptr, part_ptr,
    dm_ptr, sched_ptr, a_desc, b_desc, c_desc,
    T, R, N, K, T_BUCKET, scale,
    stride_at, stride_ar, stride_br, stride_bn, stride_cr, stride_ck, stride_en, stride_ek,
    stride_fn, stride_fk, stride_mk, stride_mj, stride_bias,
    K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FACTOR: tl.constexpr, GRAD_M: tl.constexpr,
    PRECISION: tl.constexpr, ADAPTER_PRECISION: tl.constexpr, DM_PRECISION: tl.constexpr,
    TMA: tl.constexpr, B_ROWS_ARE_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr, PERSISTENT: tl.constexpr,
):  # fmt: skip
    # TMA: the main loops load A, B and C through tensor descriptors (a_desc, b_desc, c_desc; their
    # tiles set per config by _config.set_tma_blocks); else through pointers (cp.async on sm_80).
    # Side tiles (z, g) are stored and read back with ordinary stores and loads, never by TMA, so no
    # proxy fence is needed between the two kinds of programs: acquire / release on the flags orders
    # them as before.
    # sched_ptr: [0] the ticket counter, [1] programs finished, [2] row blocks whose dM part is
    # written, then a ready flag per row block, then (FACTOR) one per column tile. Zero at launch.
    #
    # Roles come from tickets, not program ids (CUDA does not promise to start blocks in id order).
    # With FACTOR the first cdiv(N, BLOCK_N) tickets compute E = P (Q) column tile by column tile.
    # The rest run group by group; a group is up to GROUP_M row blocks: first their side programs,
    # then their output tiles column by column, so consecutive programs share a tile of B in L2 and
    # a group's rows of A stay in L2 across its columns.
    # PROGRAMS_PER_SM > 0 (persistent grid): the launch has min(SMs x PROGRAMS_PER_SM, tickets)
    # programs and each loops: take a ticket, do its work, take the next, until the tickets run
    # out. PROGRAMS_PER_SM == 0: one program per ticket, each doing one.
    # Deadlock freedom: a program waits only on flags set by the work of lower tickets (an output
    # tile on its group's side programs and on the factor programs, the last side program of a
    # backward's dM on nothing: it only sums what was released before its increment), and only
    # after its own main loop. A program holds one ticket at a time and takes the next only after
    # finishing the current one, so it never waits while holding an unfinished lower ticket. A
    # lower ticket was taken earlier, by a program that is therefore running (it has an SM: a
    # program takes tickets only while it runs, and one that is still to start holds none) and
    # that is busy with that very ticket or done with it. So the lowest unfinished ticket never
    # waits on an unfinished one: it completes, and by induction every ticket does. This holds
    # whether or not all programs of the grid are resident at once.
    n_row_blocks = tl.cdiv(T, BLOCK_M)
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    n_factor = n_col_tiles if FACTOR else 0
    n_tickets = n_factor + n_row_blocks * (1 + n_col_tiles)
    ticket = tl.atomic_add(sched_ptr, 1)
    if PERSISTENT:
        # disable_licm: otherwise LLVM hoists every role's per-thread index arithmetic (the tiles'
        # offsets and masks) out of the ticket loop, where it stays live across the main loops:
        # 12-292 B of spills per thread at 128 x 256 on sm_90a and up to 260 B on sm_80 (ptxas,
        # Triton 3.7.1). A noinline _run_ticket avoids them too, but ptxas then serialises every
        # wgmma ("wgmma pipeline crossing function boundary", C7510); tests/kernels/test_static.py
        # checks for both.
        while tl.condition(ticket < n_tickets, disable_licm=True):
            _run_ticket(
                ticket, a_ptr, b_ptr, c_ptr, e_ptr, f_ptr, m_ptr, bias_ptr, out_ptr, side_ptr,
                zs_ptr, part_ptr, dm_ptr, sched_ptr, a_desc, b_desc, c_desc,
                T, R, N, K, scale, n_row_blocks, n_col_tiles, n_factor,
                stride_at, stride_ar, stride_br, stride_bn, stride_cr, stride_ck, stride_en,
                stride_ek, stride_fn, stride_fk, stride_mk, stride_mj, stride_bias,
                K_PAD, HAS_BIAS, FACTOR, GRAD_M, PRECISION, ADAPTER_PRECISION, DM_PRECISION, TMA,
                B_ROWS_ARE_N, BLOCK_M, BLOCK_N, BLOCK_R, GROUP_M,
            )  # fmt: skip
            if TMA and not _INTERPRETED:
                _fence_proxy_async(ticket)
            ticket = tl.atomic_add(sched_ptr, 1)
    else:  # the grid has one program per ticket: every ticket taken is in range
        _run_ticket(
            ticket, a_ptr, b_ptr, c_ptr, e_ptr, f_ptr, m_ptr, bias_ptr, out_ptr, side_ptr,
            zs_ptr, part_ptr, dm_ptr, sched_ptr, a_desc, b_desc, c_desc,
            T, R, N, K, scale, n_row_blocks, n_col_tiles, n_factor,
            stride_at, stride_ar, stride_br, stride_bn, stride_cr, stride_ck, stride_en,
            stride_ek, stride_fn, stride_fk, stride_mk, stride_mj, stride_bias,
            K_PAD, HAS_BIAS, FACTOR, GRAD_M, PRECISION, ADAPTER_PRECISION, DM_PRECISION, TMA,
            B_ROWS_ARE_N, BLOCK_M, BLOCK_N, BLOCK_R, GROUP_M,
        )  # fmt: skip
    # The program that finishes last puts the schedule back to zero for the next launch, so no
    # launch needs a memset first (and a captured CUDA graph replays correctly). Each program
    # increments the finished count once, after taking its last ticket (with a persistent grid the
    # one past the end, which ends its loop) and passing its last wait: when the count reaches the
    # grid's size no program will touch the counter or a flag again.
    tl.debug_barrier()
    if tl.atomic_add(sched_ptr + 1, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        flags_ptr = sched_ptr + 3
        n_flags = n_row_blocks + n_factor
        for i in range(0, n_flags, 1024):
            offs = i + tl.arange(0, 1024)
            tl.store(flags_ptr + offs, tl.zeros((1024,), dtype=tl.int32), mask=offs < n_flags)
        head = tl.arange(0, 4)
        tl.store(sched_ptr + head, tl.zeros((4,), dtype=tl.int32), mask=head < 3)


def _padded_rank(rank: int) -> int:
    """K padded to a power of two >= 16, the smallest operand size of tl.dot."""
    return max(16, next_power_of_2(rank))


# One schedule buffer per (device, stream), zeroed once: the kernel leaves it at zero when it ends.
# Launches on one stream run one after another, so they can share it; another stream gets its own.
_SCHEDULES: dict[tuple, Tensor] = {}
_MIN_SCHEDULE = 4096


def _schedule(device: torch.device, n: int) -> Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _SCHEDULES.get(key)
    if buf is None or buf.numel() < n:
        buf = _SCHEDULES[key] = torch.zeros(max(n, _MIN_SCHEDULE), dtype=torch.int32, device=device)
    return buf


# Under the interpreter the persistent grid is sized for a pretend device of this many SMs: small,
# so that the tests' shapes have more tickets than programs and each program loops.
INTERPRETER_SMS = 2


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_properties(_device_index(device))[0]


def _sm90(a: Tensor) -> bool:
    """Whether `a` is on a GPU with wgmma and TMA (compute capability 9.x or later)."""
    return a.is_cuda and _cuda_properties(_device_index(a.device))[1] >= (9, 0)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _cuda_properties(index: int) -> tuple[int, tuple[int, int]]:
    """(SMs, compute capability) of CUDA device `index`: asked once, not on every launch."""
    properties = torch.cuda.get_device_properties(index)
    return properties.multi_processor_count, (properties.major, properties.minor)


def _launch(
    a: Tensor, b: Tensor, c: Tensor, e: Tensor, bias: Tensor | None,
    out: Tensor, side: Tensor, adapter_precision: str,
    factor: tuple[Tensor, Tensor, float] | None = None,
    grad_m: tuple[Tensor, Tensor] | None = None,
) -> None:  # fmt: skip
    """out = A B + bias + side E^T and side = A C (module docstring); out may have N = 0 columns.
    factor = (F, M', s): E (N, K) fp32 is scratch that the launch fills with s F M' first.
    grad_m = (z, dM): dM (K, K) fp32 = s side^T z, with s from factor."""
    T, R = a.shape
    N, K = b.shape[1], c.shape[1]
    if T == 0:
        return
    k_pad = _padded_rank(K)
    n_sched = 3 + cdiv(T, MIN_BLOCK_M) + cdiv(N, MIN_BLOCK_N)
    sched = _schedule(a.device, n_sched)
    f, m, scale = factor if factor is not None else (e, e, 1.0)
    zs, dm = grad_m if grad_m is not None else (side, e)
    part = e
    if grad_m is not None:
        part = torch.empty(cdiv(T, MIN_BLOCK_M), k_pad, k_pad, device=a.device)

    sms = _sm_count(a.device)

    def grid(meta):
        n_col_tiles = cdiv(N, meta["BLOCK_N"])
        n_factor = n_col_tiles if factor is not None else 0
        n_tickets = n_factor + cdiv(T, meta["BLOCK_M"]) * (1 + n_col_tiles)
        if not meta["PERSISTENT"]:
            return (n_tickets,)
        return (min(n_tickets, sms * meta["PROGRAMS_PER_SM"]),)

    descs = _descriptors(a, b, c, N, k_pad)
    device = torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext()
    with device:
        _fused_kernel[grid](
            a, b, c, e, f, m, bias if bias is not None else e, out, side, zs, part, dm, sched,
            *(descs or (None, None, None)),
            T, R, N, K, max(16, next_power_of_2(T)), float(scale),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            e.stride(0), e.stride(1), f.stride(0), f.stride(1), m.stride(0), m.stride(1),
            bias.stride(0) if bias is not None else 0,
            K_PAD=k_pad, HAS_BIAS=bias is not None, FACTOR=factor is not None,
            GRAD_M=grad_m is not None,
            PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
            ADAPTER_PRECISION=adapter_precision,
            DM_PRECISION=_dm_precision(a),
            TMA=descs is not None, B_ROWS_ARE_N=b.stride(0) == 1 and b.stride(1) != 1,
            PERSISTENT=N > 0,
        )  # fmt: skip


def _dm_precision(a: Tensor) -> str:
    """How the backward multiplies g^T z for dM (_grad_m_part): exact fp32 products in fp32 and where
    the GPU has wgmma (sm_90), TF32 on sm_80's mma.sync (see _grad_m_part)."""
    if a.dtype == torch.float32 or not a.is_cuda or _sm90(a):
        return "ieee"
    return "tf32"


def _tma_wanted(a: Tensor) -> bool:
    if TMA_MODE != "auto":
        return TMA_MODE == "on"
    return _sm90(a)


def _descriptors(a: Tensor, b: Tensor, c: Tensor, N: int, k_pad: int) -> tuple | None:
    """Tensor descriptors of A, B (or B^T when B is a transposed view) and C for the TMA main loops,
    or None where TMA cannot serve: not wanted (sm_80, ATTRSPACE_TRITON_TMA=off), no output columns,
    a non-unit inner stride, a stride or base not 16-byte aligned, or a C tile row wider than 128 B.
    Block shapes are placeholders until the chosen config's pre-hook sets them."""
    if N == 0 or not _tma_wanted(a):
        return None
    b_rows = b.t() if b.stride(0) == 1 and b.stride(1) != 1 else b
    width = a.element_size()
    tensors = (a, b_rows, c)
    if k_pad * width > 128 or any(
        t.stride(1) != 1 or (t.stride(0) * width) % 16 or t.data_ptr() % 16 for t in tensors
    ):
        return None
    return tuple(TensorDescriptor.from_tensor(t, [16, 16]) for t in tensors)


def _check_matrix(name: str, t: Tensor, shape: tuple[int, int], dtype: torch.dtype, device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}")


def _check_output(name: str, t: Tensor | None, shape, dtype, device) -> Tensor:
    """The caller's output buffer after checks, or a new one."""
    if t is None:
        return torch.empty(shape, dtype=dtype, device=device)
    _check_matrix(name, t, shape, dtype, device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def _check_common(
    name: str,
    a: Tensor,
    weight: Tensor,
    basis_name: str,
    basis: Tensor,
    adapter_precision: str | None,
) -> str:
    """Checks shared by both passes; returns the adapter precision to use."""
    if not isinstance(a, Tensor) or a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D Tensor (T, features), got {getattr(a, 'shape', a)}")
    if a.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {a.dtype}")
    if INTERPRET and a.dtype == torch.bfloat16:
        raise TypeError("the Triton interpreter cannot compute in bfloat16; run bfloat16 on a GPU")
    if not a.is_cuda and not INTERPRET:
        raise ValueError(
            f"{name} is on {a.device}; CPU tensors need TRITON_INTERPRET=1 set before "
            "attrspace.kernels is imported"
        )
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError(
            f"weight must be a 2-D Tensor (d_out, d_in), got {getattr(weight, 'shape', weight)}"
        )
    if not isinstance(basis, Tensor) or basis.ndim != 2:
        raise ValueError(
            f"{basis_name} must be a 2-D Tensor (features, K), got {getattr(basis, 'shape', basis)}"
        )
    if not 1 <= basis.shape[1] <= MAX_RANK:
        raise ValueError(
            f"the rank K ({basis_name}.shape[1]) must be in 1..{MAX_RANK}, got {basis.shape[1]}"
        )
    precision = adapter_precision or _DEFAULT_ADAPTER_PRECISION[a.dtype]
    if precision not in ADAPTER_PRECISIONS:
        raise ValueError(
            f"adapter_precision must be one of {ADAPTER_PRECISIONS}, got {precision!r}"
        )
    if precision == "input" and a.dtype == torch.float32:
        raise ValueError(
            'adapter_precision="input" is for float16 / bfloat16 inputs; use "ieee" or "tf32"'
        )
    return precision


def subspace_linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    V: Tensor,
    P: Tensor,
    *,
    out: Tensor | None = None,
    z_out: Tensor | None = None,
    adapter_precision: str | None = None,
) -> tuple[Tensor, Tensor]:
    """y = x W^T + b + z P^T and z = x V in one launch (see attrspace.adapters.reference.forward).

    x: (T, d_in) fp32 / fp16 / bf16; weight: (d_out, d_in), bias: (d_out,) or None and V: (d_in, K), all
    in x.dtype; P = s U M: (d_out, K) fp32, 1 <= K <= 128. out: (T, d_out) and z_out: (T, K), x.dtype,
    contiguous, optional buffers to write into (tests poison them). adapter_precision: how z P^T is
    multiplied (ADAPTER_PRECISIONS; default "ieee" for fp32, "tf32" for fp16, "input" for bf16).
    Returns y: (T, d_out) and z: (T, K), both x.dtype, each rounded once from its fp32 sum; the adapter
    term of y uses z as returned (x.dtype), added to y's fp32 accumulator before its one rounding.
    """
    precision = _check_common("x", x, weight, "V", V, adapter_precision)
    (T, d_in), d_out, K = x.shape, weight.shape[0], V.shape[1]
    _check_matrix("weight", weight, (d_out, d_in), x.dtype, x.device)
    _check_matrix("V", V, (d_in, K), x.dtype, x.device)
    _check_matrix("P", P, (d_out, K), torch.float32, x.device)
    if bias is not None and (tuple(bias.shape) != (d_out,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({d_out},) {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    y = _check_output("out", out, (T, d_out), x.dtype, x.device)
    z = _check_output("z_out", z_out, (T, K), x.dtype, x.device)
    _launch(x, weight.t(), V, P, bias, y, z, precision)
    return y, z


def subspace_linear_backward(
    dy: Tensor,
    weight: Tensor,
    U: Tensor,
    Q: Tensor,
    need_dx: bool = True,
    *,
    dx_out: Tensor | None = None,
    g_out: Tensor | None = None,
    adapter_precision: str | None = None,
) -> tuple[Tensor | None, Tensor]:
    """dx = dy W + g Q^T and g = dy U in one launch (see attrspace.adapters.reference.backward).

    dy: (T, d_out) fp32 / fp16 / bf16; weight: (d_out, d_in) and U: (d_out, K) in dy.dtype;
    Q = s V M^T: (d_in, K) fp32, 1 <= K <= 128. dx_out: (T, d_in) dy.dtype and g_out: (T, K) fp32,
    contiguous, optional buffers. With need_dx False only g is computed and dx is None.
    Returns dx: (T, d_in) dy.dtype (rounded once from fp32) or None, and g: (T, K) fp32.
    """
    precision = _check_common("dy", dy, weight, "U", U, adapter_precision)
    (T, d_out), d_in, K = dy.shape, weight.shape[1], U.shape[1]
    _check_matrix("weight", weight, (d_out, d_in), dy.dtype, dy.device)
    _check_matrix("U", U, (d_out, K), dy.dtype, dy.device)
    _check_matrix("Q", Q, (d_in, K), torch.float32, dy.device)
    g = _check_output("g_out", g_out, (T, K), torch.float32, dy.device)
    if need_dx:
        dx = _check_output("dx_out", dx_out, (T, d_in), dy.dtype, dy.device)
        _launch(dy, weight, U, Q, None, dx, g, precision)
        return dx, g
    # No output columns: the launch runs only the side programs.
    _launch(dy, weight[:, :0], U, Q, None, g, g, precision)
    return None, g


def _check_factored(name: str, a: Tensor, U: Tensor, V: Tensor, M: Tensor, scale: float) -> None:
    d_out, d_in, K = U.shape[0], V.shape[0], M.shape[0]
    _check_matrix("U", U, (d_out, K), a.dtype, a.device)
    _check_matrix("V", V, (d_in, K), a.dtype, a.device)
    _check_matrix("M", M, (K, K), torch.float32, a.device)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


def subspace_linear_forward_factored(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    U: Tensor,
    V: Tensor,
    M: Tensor,
    scale: float,
    *,
    out: Tensor | None = None,
    z_out: Tensor | None = None,
    adapter_precision: str | None = None,
) -> tuple[Tensor, Tensor]:
    """subspace_linear_forward with P = scale U M formed inside the same launch (its first programs,
    column tile by column tile): one launch per forward. M: (K, K) fp32; U: (d_out, K) in x.dtype."""
    precision = _check_common("x", x, weight, "V", V, adapter_precision)
    (T, d_in), d_out, K = x.shape, weight.shape[0], V.shape[1]
    _check_matrix("weight", weight, (d_out, d_in), x.dtype, x.device)
    _check_factored("x", x, U, V, M, scale)
    if bias is not None and (tuple(bias.shape) != (d_out,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({d_out},) {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    y = _check_output("out", out, (T, d_out), x.dtype, x.device)
    z = _check_output("z_out", z_out, (T, K), x.dtype, x.device)
    P = torch.empty(d_out, K, dtype=torch.float32, device=x.device)
    _launch(x, weight.t(), V, P, bias, y, z, precision, factor=(U, M, scale))
    return y, z


def subspace_linear_backward_factored(
    dy: Tensor,
    weight: Tensor,
    U: Tensor,
    V: Tensor,
    M: Tensor,
    z: Tensor,
    scale: float,
    need_dx: bool = True,
    *,
    adapter_precision: str | None = None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The whole backward in one launch: Q = scale V M^T (first programs), g = dy U, dx = dy W + g Q^T
    (unless need_dx is False) and dM = scale g^T z, reduced inside the launch in a fixed order.
    z: (T, K) as the forward returned it. Returns dx (dy.dtype) or None, g and dM (fp32)."""
    precision = _check_common("dy", dy, weight, "U", U, adapter_precision)
    (T, d_out), d_in, K = dy.shape, weight.shape[1], U.shape[1]
    _check_matrix("weight", weight, (d_out, d_in), dy.dtype, dy.device)
    _check_factored("dy", dy, U, V, M, scale)
    _check_matrix("z", z, (T, K), dy.dtype, dy.device)
    if not z.is_contiguous():
        raise ValueError("z must be contiguous")
    g = torch.empty(T, K, dtype=torch.float32, device=dy.device)
    dm = torch.empty(K, K, dtype=torch.float32, device=dy.device) if T else M.new_zeros(K, K)
    Q = torch.empty(d_in, K, dtype=torch.float32, device=dy.device)
    if need_dx:
        dx = torch.empty(T, d_in, dtype=dy.dtype, device=dy.device)
        _launch(dy, weight, U, Q, None, dx, g, precision, (V, M.t(), scale), (z, dm))
        return dx, g, dm
    _launch(dy, weight[:, :0], U, Q, None, g, g, precision, (V, M.t(), scale), (z, dm))
    return None, g, dm
