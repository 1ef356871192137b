"""The `cuda` backend: the backend contract (attrspace.backends) over the CUDA kernels of csrc/.

Two launchers run the same kernels: attrspace._C when it was built with nvcc, else cupy's NVRTC build
of the same sources (attrspace.backends.cupy_jit) when cupy is installed on a GPU machine. Both take device
addresses: outputs and scratch are allocated here with torch, and every launch goes to torch's current
stream of the input's device. Each pass is one launch (no memset: the kernels leave their schedule at
zero). The whole-layer entry points (forward_factored / backward_factored) form P = s U M, Q = s V M^T
and dM = s g^T z inside those launches. Each pass is also a torch.library custom op with a fake
implementation, so torch.compile sees typed ops rather than an opaque extension call.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from attrspace.adapters import reference
from attrspace.backends import cupy_jit
from attrspace.backends import native as _native
from attrspace.backends.jacobi import jacobi_svd
from attrspace.backends.ops import adapter_custom_ops, factored_custom_ops

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_RANK = 128
_MIN_CAPABILITY = (8, 0)  # cp.async, bf16 and tf32 mma.sync
_MAX_SIZE = 2**30 - 1  # the kernels index a dimension with 32-bit ints
_KERNEL_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@functools.cache
def launcher_name() -> str | None:
    """Which launcher runs the kernels: "native" (attrspace._C with its CUDA part), "cupy" (NVRTC
    JIT of the same sources) or None (neither can run here)."""
    if _native.cuda_unavailable_reason() is None:
        return "native"
    if cupy_jit.unavailable_reason() is None:
        return "cupy"
    return None


def unavailable_reason() -> str | None:
    """None when the CUDA kernels can run on this machine, else why not."""
    if launcher_name() is None:
        return (
            f"{_native.cuda_unavailable_reason()}, and the cupy JIT of the same kernels is unavailable "
            f"({cupy_jit.unavailable_reason()})"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def unsupported_reasons(x: Tensor, weight: Tensor, rank: int) -> list[str]:
    """Every reason the kernels cannot run input x (..., d_in) of a (d_out, d_in) layer with rank K."""
    reasons = []
    if x.device.type != "cuda":
        reasons.append(f"x is on {x.device} (the kernels take CUDA tensors)")
    elif torch.cuda.get_device_capability(x.device) < _MIN_CAPABILITY:
        capability = torch.cuda.get_device_capability(x.device)
        reasons.append(f"compute capability {capability} < {_MIN_CAPABILITY} (needs sm_80 MMAs)")
    if x.dtype not in DTYPE_CODES:
        reasons.append(f"dtype {x.dtype} (the kernels take float32, float16 and bfloat16)")
    if weight.dtype != x.dtype:
        reasons.append(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if not 1 <= rank <= MAX_RANK:
        reasons.append(f"K={rank} outside 1..{MAX_RANK}")
    if not weight.is_contiguous():
        reasons.append("weight is not contiguous (the kernels read it row-major, in place)")
    tokens = x.numel() // max(x.shape[-1], 1) if x.ndim > 0 else 0
    if max(tokens, *weight.shape) > _MAX_SIZE:
        reasons.append(f"a size above {_MAX_SIZE} (tokens {tokens}, weight {tuple(weight.shape)})")
    return reasons


def schedule_ints(tokens: int, n: int) -> int:
    """int32 schedule elements of a launch over `tokens` rows and `n` output columns: three counters,
    a flag per row block and one per output column tile (blocks of >= 64 rows / columns)."""
    return 3 + -(-tokens // 64) + -(-n // 64)


def grad_part_floats(tokens: int, rank: int) -> int:
    """fp32 scratch elements of the backward's dM reduction: a K x K part per row block (>= 64 rows)."""
    return -(-tokens // 64) * rank * rank


# One schedule per (device, stream), zeroed once: every launch leaves it at zero (its last block
# resets it), so no launch needs a memset. Launches on one stream run one after another and can share
# it; another stream gets its own.
_SCHEDULES: dict[tuple, Tensor] = {}
_MIN_SCHEDULE = 4096


def _schedule(device: torch.device, n: int) -> Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _SCHEDULES.get(key)
    if buf is None or buf.numel() < n:
        buf = _SCHEDULES[key] = torch.zeros(max(n, _MIN_SCHEDULE), dtype=torch.int32, device=device)
    return buf


def _check_2d(name: str, t: Tensor, shape: tuple[int, int], dtype: torch.dtype, device) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _scratch(*shape: int, device: torch.device) -> Tensor:
    """fp32 scratch that a launch fills before it reads it (tests poison it through this name)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _address(t: Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _launch(
    kind: str,
    dtype: torch.dtype,
    pointers: tuple[int, ...],
    sizes: tuple[int, ...],
    scale: float,
    schedule: Tensor,
) -> None:
    """Run pass `kind` ("forward" / "backward") on the current stream of schedule's device.

    pointers: the 14 addresses of FusedGemmArgs (a, b_main, b_proj, bias, e, out, proj32, proj,
    schedule, factor, core, side, dm, part; 0 for null), sizes (m, n, kd, rank) and the scale, see
    csrc/subspace_linear_common.cuh. The schedule is all zero and the launch leaves it so.
    """
    device = schedule.device
    with torch.cuda.device(device):
        if launcher_name() == "native":
            stream = torch.cuda.current_stream(device).cuda_stream
            module = _native.native()
            code = DTYPE_CODES[dtype]
            a, b, c, bias, e, out, p32, proj, sched, factor, core, side, dm, part = pointers
            tokens, n, kd, rank = sizes
            if kind == "forward":
                module.subspace_forward(
                    a, b, bias, c, e, out, proj, p32, sched, tokens, kd, n, rank, code, stream,
                    u=factor, m=core, scale=scale,
                )  # fmt: skip
            else:
                module.subspace_backward(
                    a, b, c, e, out, p32, sched, tokens, n, kd, rank, code, stream,
                    v=factor, m=core, z=side, dm=dm, part=part, scale=scale,
                )  # fmt: skip
        else:
            name = f"attrspace_{kind}_{_KERNEL_SUFFIX[dtype]}"
            cupy_jit.launch(name, pointers, sizes, scale, dtype, device)


def _check_forward(x: Tensor, weight: Tensor, bias: Tensor | None, V: Tensor) -> Tensor | None:
    """Checks of x, weight, bias and V; returns the bias to read (contiguous) or None."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (T, d_in), got shape {tuple(x.shape)}")
    (T, d_in), d_out, K = x.shape, weight.shape[0], V.shape[-1]
    dtype, device = x.dtype, x.device
    if dtype not in DTYPE_CODES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {dtype}")
    if not 1 <= K <= MAX_RANK:
        raise ValueError(f"the rank K (V.shape[1]) must be in 1..{MAX_RANK}, got {K}")
    _check_2d("x", x, (T, d_in), dtype, device)
    _check_2d("weight", weight, (d_out, d_in), dtype, device)
    _check_2d("V", V, (d_in, K), dtype, device)
    if bias is None:
        return None
    if tuple(bias.shape) != (d_out,) or bias.dtype != dtype or bias.device != device:
        raise ValueError(
            f"bias must be ({d_out},) {dtype} on {device}, got {tuple(bias.shape)} {bias.dtype}"
        )
    return bias.contiguous()


def _run_forward(x, weight, bias, V, P, y, z, factor: tuple[Tensor, Tensor, float] | None) -> None:
    """The forward launch, P given or (factor = (U, M, s)) formed into the P scratch."""
    T, d_in = x.shape
    d_out, K = weight.shape[0], V.shape[1]
    if T == 0:
        return
    U, M, scale = factor if factor is not None else (None, None, 1.0)
    z32 = _scratch(T, K, device=x.device)
    schedule = _schedule(x.device, schedule_ints(T, d_out))
    pointers = (
        x.data_ptr(), weight.data_ptr(), V.data_ptr(), _address(bias), P.data_ptr(), y.data_ptr(),
        z32.data_ptr(), z.data_ptr(), schedule.data_ptr(), _address(U), _address(M), 0, 0, 0,
    )  # fmt: skip
    _launch("forward", x.dtype, pointers, (T, d_out, d_in, K), float(scale), schedule)


def forward_into(
    x: Tensor, weight: Tensor, bias: Tensor | None, V: Tensor, P: Tensor, y: Tensor, z: Tensor
) -> None:
    """Write y = x W^T + b + z32 P^T and z = x V into the given buffers, in one launch.

    x: (T, d_in); weight: (d_out, d_in); bias: (d_out,) or None; V: (d_in, K), all of one dtype
    (fp32, fp16 or bf16) on one CUDA device, contiguous; P: (d_out, K) fp32. y: (T, d_out) and
    z: (T, K) in x's dtype. T = 0 launches nothing.
    """
    bias = _check_forward(x, weight, bias, V)
    (T, _), d_out, K = x.shape, weight.shape[0], V.shape[1]
    _check_2d("P", P, (d_out, K), torch.float32, x.device)
    _check_2d("y", y, (T, d_out), x.dtype, x.device)
    _check_2d("z", z, (T, K), x.dtype, x.device)
    _run_forward(x, weight, bias, V, P, y, z, None)


def forward_factored_into(
    x: Tensor, weight: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, M: Tensor, scale: float,
    y: Tensor, z: Tensor,
) -> None:  # fmt: skip
    """forward_into with P = scale U M formed by the same launch's first blocks: U (d_out, K) in x's
    dtype, M (K, K) fp32, both contiguous."""
    bias = _check_forward(x, weight, bias, V)
    (T, _), d_out, K = x.shape, weight.shape[0], V.shape[1]
    _check_2d("U", U, (d_out, K), x.dtype, x.device)
    _check_2d("M", M, (K, K), torch.float32, x.device)
    _check_2d("y", y, (T, d_out), x.dtype, x.device)
    _check_2d("z", z, (T, K), x.dtype, x.device)
    P = _scratch(d_out, K, device=x.device)  # filled by the launch's first blocks
    _run_forward(x, weight, bias, V, P, y, z, (U, M, scale))


def _check_backward(dy: Tensor, weight: Tensor, U: Tensor) -> None:
    if dy.ndim != 2:
        raise ValueError(f"dy must be 2-D (T, d_out), got shape {tuple(dy.shape)}")
    (T, d_out), d_in, K = dy.shape, weight.shape[1], U.shape[-1]
    dtype, device = dy.dtype, dy.device
    if dtype not in DTYPE_CODES:
        raise TypeError(f"dy must be float32, float16 or bfloat16, got {dtype}")
    if not 1 <= K <= MAX_RANK:
        raise ValueError(f"the rank K (U.shape[1]) must be in 1..{MAX_RANK}, got {K}")
    _check_2d("weight", weight, (d_out, d_in), dtype, device)
    _check_2d("U", U, (d_out, K), dtype, device)
    _check_2d("dy", dy, (T, d_out), dtype, device)


def backward_into(
    dy: Tensor, weight: Tensor, U: Tensor, Q: Tensor, dx: Tensor | None, g: Tensor
) -> None:
    """Write g = dy U (fp32) and, when dx is given, dx = dy W + g Q^T into the given buffers.

    dy: (T, d_out); weight: (d_out, d_in); U: (d_out, K), one dtype on one CUDA device, contiguous;
    Q: (d_in, K) fp32. dx: (T, d_in) in dy's dtype or None; g: (T, K) fp32. One launch.
    """
    _check_backward(dy, weight, U)
    (T, d_out), d_in, K = dy.shape, weight.shape[1], U.shape[1]
    _check_2d("Q", Q, (d_in, K), torch.float32, dy.device)
    _check_2d("g", g, (T, K), torch.float32, dy.device)
    if dx is not None:
        _check_2d("dx", dx, (T, d_in), dy.dtype, dy.device)
    if T == 0:
        return
    schedule = _schedule(dy.device, schedule_ints(T, d_in))
    pointers = (
        dy.data_ptr(), weight.data_ptr(), U.data_ptr(), 0, Q.data_ptr(), _address(dx),
        g.data_ptr(), 0, schedule.data_ptr(), 0, 0, 0, 0, 0,
    )  # fmt: skip
    _launch("backward", dy.dtype, pointers, (T, d_in, d_out, K), 1.0, schedule)


def backward_factored_into(
    dy: Tensor, weight: Tensor, U: Tensor, V: Tensor, M: Tensor, z: Tensor, scale: float,
    dx: Tensor | None, dm: Tensor,
) -> None:  # fmt: skip
    """The whole backward in one launch: Q = scale V M^T (first blocks, when dx is wanted), g = dy U,
    dx = dy W + g Q^T into dx unless it is None, and dm = scale g^T z (fp32, reduced in the launch
    in a fixed order). V (d_in, K) and z (T, K, the forward's) in dy's dtype, M (K, K) fp32."""
    _check_backward(dy, weight, U)
    (T, d_out), d_in, K = dy.shape, weight.shape[1], U.shape[1]
    _check_2d("V", V, (d_in, K), dy.dtype, dy.device)
    _check_2d("M", M, (K, K), torch.float32, dy.device)
    _check_2d("z", z, (T, K), dy.dtype, dy.device)
    _check_2d("dm", dm, (K, K), torch.float32, dy.device)
    if dx is not None:
        _check_2d("dx", dx, (T, d_in), dy.dtype, dy.device)
    if T == 0:
        dm.zero_()
        return
    g = _scratch(T, K, device=dy.device)
    Q = _scratch(d_in, K, device=dy.device)  # filled by the launch's first blocks
    part = _scratch(grad_part_floats(T, K), device=dy.device)
    schedule = _schedule(dy.device, schedule_ints(T, d_in))
    pointers = (
        dy.data_ptr(), weight.data_ptr(), U.data_ptr(), 0, Q.data_ptr(), _address(dx),
        g.data_ptr(), 0, schedule.data_ptr(), V.data_ptr(), M.data_ptr(), z.data_ptr(),
        dm.data_ptr(), part.data_ptr(),
    )  # fmt: skip
    _launch("backward", dy.dtype, pointers, (T, d_in, d_out, K), float(scale), schedule)


def _forward_launch(
    x: Tensor, weight: Tensor, bias: Tensor | None, V: Tensor, P: Tensor
) -> tuple[Tensor, Tensor]:
    y, z = reference.empty_forward_outputs(x, weight, V)
    forward_into(x, weight, bias, V, P, y, z)
    return y, z


def _backward_launch(
    dy: Tensor, weight: Tensor, U: Tensor, Q: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor]:
    dx, g = reference.empty_backward_outputs(dy, weight, U, need_dx)
    backward_into(dy, weight, U, Q, dx if need_dx else None, g)
    return dx, g


def _forward_factored_launch(
    x: Tensor, weight: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, M: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    x, U, V, M = x.contiguous(), U.contiguous(), V.contiguous(), M.contiguous()
    y, z = reference.empty_forward_outputs(x, weight, V)
    forward_factored_into(x, weight, bias, U, V, M, scale, y, z)
    return y, z


def _backward_factored_launch(
    dy: Tensor, weight: Tensor, U: Tensor, V: Tensor, M: Tensor, z: Tensor, scale: float,
    need_dx: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    dy, U, V, M, z = dy.contiguous(), U.contiguous(), V.contiguous(), M.contiguous(), z.contiguous()
    dx = reference.empty_backward_outputs(dy, weight, U, need_dx)[0]
    dm = torch.empty(M.shape, dtype=torch.float32, device=dy.device)
    backward_factored_into(dy, weight, U, V, M, z, scale, dx if need_dx else None, dm)
    return dx, dm


_forward_op, _backward_op = adapter_custom_ops("cuda", _forward_launch, _backward_launch)
_forward_factored_op, _backward_factored_op = factored_custom_ops(
    "cuda", _forward_factored_launch, _backward_factored_launch
)


def forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, V: Tensor, P: Tensor
) -> tuple[Tensor, Tensor]:
    """y = x W^T + b + z32 P^T and z = x V in one launch; shapes as attrspace.adapters.reference.forward."""
    return _forward_op(x.contiguous(), weight, bias, V.contiguous(), P.contiguous())


def backward(
    dy: Tensor, weight: Tensor, U: Tensor, Q: Tensor, need_dx: bool
) -> tuple[Tensor | None, Tensor]:
    """dx = dy W + g Q^T and g = dy U in fp32, in one launch; as attrspace.adapters.reference.backward."""
    dx, g = _backward_op(dy.contiguous(), weight, U.contiguous(), Q.contiguous(), need_dx)
    return (dx if need_dx else None), g


# The whole-layer entry points (attrspace.backends.ops; adapters.functional uses them): P and Q are
# formed and dM is reduced inside the launches, so a forward is one launch and a backward one more
# (plus autograd's `M.grad +=` when a gradient is already there).


def forward_factored(
    x: Tensor, weight: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, M: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """y and z as forward() with P = scale U M formed in the same launch; M (K, K) fp32."""
    if torch.compiler.is_compiling():
        return _forward_factored_op(x, weight, bias, U, V, M, scale)
    # Eager: the launcher directly (a custom op's dispatch costs more host time than the launch).
    return _forward_factored_launch(x, weight, bias, U, V, M, scale)


def backward_factored(
    dy: Tensor, weight: Tensor, U: Tensor, V: Tensor, M: Tensor, z: Tensor, scale: float,
    need_dx: bool,
) -> tuple[Tensor | None, Tensor]:  # fmt: skip
    """dx (None unless need_dx) and dM = scale g^T z (fp32), with Q formed, in one launch."""
    args = (dy, weight, U, V, M, z, scale, need_dx)
    if torch.compiler.is_compiling():
        dx, dm = _backward_factored_op(*args)
    else:
        dx, dm = _backward_factored_launch(*args)
    return (dx if need_dx else None), dm


# Randomized-SVD step (attrspace.backends.ops): the small SVDs as the extension's batched one-sided
# Jacobi SVD (one matrix per CPU task or per GPU thread block); the GEMMs and the orthonormalisation
# run the torch backend's.


def rsvd_unavailable_reason(device: torch.device) -> str | None:
    if device.type not in ("cpu", "cuda"):
        return f"the extension's Jacobi SVD runs on CPU and CUDA tensors, not on {device}"
    module = _native.native()
    if module is None:
        return _native.native_unavailable_reason()
    if not hasattr(module, "jacobi_svd_cpu"):
        return "attrspace._C was built before the Jacobi SVD existed: rebuild it (pip install .)"
    return _native.cuda_unavailable_reason() if device.type == "cuda" else None


def rsvd_small_svd(core: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return jacobi_svd(core)
