"""The `cuda` backend: the backend contract (attrspace.backends) over the CUDA kernels of csrc/.

Two launchers run the same kernels: attrspace._C when it was built with nvcc, else cupy's NVRTC build
of the same sources (attrspace.backends.cupy_jit) when cupy is installed on a GPU machine. Both take device
addresses: outputs and scratch are allocated here with torch, and every launch goes to torch's current
stream of the input's device. Each pass is a torch.library custom op with a fake implementation, so
torch.compile sees typed ops rather than an opaque extension call.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from attrspace.adapters import reference
from attrspace.backends import cupy_jit
from attrspace.backends import native as _native
from attrspace.backends.jacobi import jacobi_svd
from attrspace.backends.ops import adapter_custom_ops

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


def schedule_ints(tokens: int) -> int:
    """int32 scratch elements of a launch: a tile-ticket counter and a flag per row block of >= 64 rows."""
    return 1 + -(-tokens // 64)


def _check_2d(name: str, t: Tensor, shape: tuple[int, int], dtype: torch.dtype, device) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _launch(
    kind: str,
    dtype: torch.dtype,
    pointers: tuple[int, ...],
    sizes: tuple[int, ...],
    schedule: Tensor,
) -> None:
    """Run pass `kind` ("forward" / "backward") on the current stream of schedule's device.

    pointers: the 9 addresses of FusedGemmArgs (a, b_main, b_proj, bias, e, out, proj32, proj,
    schedule; 0 for null) and sizes (m, n, kd, rank), see csrc/subspace_linear_common.cuh.
    """
    device = schedule.device
    with torch.cuda.device(device):
        if launcher_name() == "native":
            stream = torch.cuda.current_stream(device).cuda_stream
            module = _native.native()
            code = DTYPE_CODES[dtype]
            if kind == "forward":
                x, w, v, bias, p, y, z32, z, sched = pointers
                tokens, d_out, d_in, rank = sizes
                module.subspace_forward(
                    x, w, bias, v, p, y, z, z32, sched, tokens, d_in, d_out, rank, code, stream
                )
            else:
                dy, w, u, _, q, dx, g, _, sched = pointers
                tokens, d_in, d_out, rank = sizes
                module.subspace_backward(
                    dy, w, u, q, dx, g, sched, tokens, d_in, d_out, rank, code, stream
                )
        else:
            name = f"attrspace_{kind}_{_KERNEL_SUFFIX[dtype]}"
            cupy_jit.launch(name, pointers, sizes, dtype, schedule, device)


def forward_into(
    x: Tensor, weight: Tensor, bias: Tensor | None, V: Tensor, P: Tensor, y: Tensor, z: Tensor
) -> None:
    """Write y = x W^T + b + z32 P^T and z = x V into the given buffers.

    x: (T, d_in); weight: (d_out, d_in); bias: (d_out,) or None; V: (d_in, K), all of one dtype
    (fp32, fp16 or bf16) on one CUDA device, contiguous; P: (d_out, K) fp32. y: (T, d_out) and
    z: (T, K) in x's dtype. T = 0 launches nothing.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (T, d_in), got shape {tuple(x.shape)}")
    (T, d_in), d_out, K = x.shape, weight.shape[0], V.shape[-1]
    dtype, device = x.dtype, x.device
    if dtype not in DTYPE_CODES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {dtype}")
    _check_2d("x", x, (T, d_in), dtype, device)
    _check_2d("weight", weight, (d_out, d_in), dtype, device)
    _check_2d("V", V, (d_in, K), dtype, device)
    _check_2d("P", P, (d_out, K), torch.float32, device)
    _check_2d("y", y, (T, d_out), dtype, device)
    _check_2d("z", z, (T, K), dtype, device)
    if bias is not None:
        if tuple(bias.shape) != (d_out,) or bias.dtype != dtype or bias.device != device:
            raise ValueError(
                f"bias must be ({d_out},) {dtype} on {device}, got {tuple(bias.shape)} {bias.dtype}"
            )
        bias = bias.contiguous()
    if T == 0:
        return
    z32 = torch.empty(T, K, dtype=torch.float32, device=device)
    schedule = torch.empty(schedule_ints(T), dtype=torch.int32, device=device)
    pointers = (
        x.data_ptr(),
        weight.data_ptr(),
        V.data_ptr(),
        bias.data_ptr() if bias is not None else 0,
        P.data_ptr(),
        y.data_ptr(),
        z32.data_ptr(),
        z.data_ptr(),
        schedule.data_ptr(),
    )
    _launch("forward", dtype, pointers, (T, d_out, d_in, K), schedule)


def backward_into(
    dy: Tensor, weight: Tensor, U: Tensor, Q: Tensor, dx: Tensor | None, g: Tensor
) -> None:
    """Write g = dy U (fp32) and, when dx is given, dx = dy W + g Q^T into the given buffers.

    dy: (T, d_out); weight: (d_out, d_in); U: (d_out, K), one dtype on one CUDA device, contiguous;
    Q: (d_in, K) fp32. dx: (T, d_in) in dy's dtype or None; g: (T, K) fp32.
    """
    if dy.ndim != 2:
        raise ValueError(f"dy must be 2-D (T, d_out), got shape {tuple(dy.shape)}")
    (T, d_out), d_in, K = dy.shape, weight.shape[1], U.shape[-1]
    dtype, device = dy.dtype, dy.device
    if dtype not in DTYPE_CODES:
        raise TypeError(f"dy must be float32, float16 or bfloat16, got {dtype}")
    _check_2d("weight", weight, (d_out, d_in), dtype, device)
    _check_2d("U", U, (d_out, K), dtype, device)
    _check_2d("Q", Q, (d_in, K), torch.float32, device)
    _check_2d("g", g, (T, K), torch.float32, device)
    if dx is not None:
        _check_2d("dx", dx, (T, d_in), dtype, device)
    _check_2d("dy", dy, (T, d_out), dtype, device)
    if T == 0:
        return
    schedule = torch.empty(schedule_ints(T), dtype=torch.int32, device=device)
    pointers = (
        dy.data_ptr(),
        weight.data_ptr(),
        U.data_ptr(),
        0,
        Q.data_ptr(),
        dx.data_ptr() if dx is not None else 0,
        g.data_ptr(),
        0,
        schedule.data_ptr(),
    )
    _launch("backward", dtype, pointers, (T, d_in, d_out, K), schedule)


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


_forward_op, _backward_op = adapter_custom_ops("cuda", _forward_launch, _backward_launch)


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
