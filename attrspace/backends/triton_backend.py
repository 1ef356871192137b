"""The `triton` backend: the backend contract (attrspace.backends) over the kernels in attrspace.kernels.

attrspace.kernels is imported only inside the functions below, when the backend is first asked whether
it is available: @triton.jit reads TRITON_INTERPRET when it decorates, so the interpreter (CPU tensors,
for tests) can be switched on until then.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch
from torch import Tensor

from attrspace.adapters import reference
from attrspace.backends.ops import adapter_custom_ops, factored_custom_ops
from attrspace.linalg.orthonormalize import cholesky_qr

_KERNELS = "attrspace.kernels.subspace_linear"
_RSVD_KERNELS = "attrspace.kernels.rsvd"
_MIN_CAPABILITY = (8, 0)  # bf16 and tf32 tensor-core MMAs
# Filled by unavailable_reason(), which attrspace.backends.preload calls before any torch.compile tracing, so that
# unsupported_reasons() is plain lookups and metadata checks (an import cannot be traced).
_loaded: dict = {}


def _kernels():
    if "kernels" not in _loaded:
        _loaded["kernels"] = importlib.import_module(_KERNELS)
        _loaded["capability"] = {
            i: torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())
        }
    return _loaded["kernels"]


def unavailable_reason() -> str | None:
    """None when the Triton kernels can run on this machine, else why not (imports them if they can)."""
    if "kernels" not in _loaded:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if not torch.cuda.is_available() and not interpret:
            return (
                "no CUDA device, and CPU tensors need TRITON_INTERPRET=1 set before "
                "attrspace.kernels is imported"
            )
    _kernels()  # an ImportError here is reported by attrspace.backends.unavailable_reason
    return None


def unsupported_reasons(x: Tensor, weight: Tensor, rank: int) -> list[str]:
    """Every reason the kernels cannot run input x (..., d_in) of a (d_out, d_in) layer with rank K."""
    kernels = _kernels()
    reasons = []
    interpreting = kernels.INTERPRET  # what @triton.jit saw when the kernels were decorated
    if x.dtype not in kernels.DTYPES:
        reasons.append(f"dtype {x.dtype} (the kernels take float32, float16 and bfloat16)")
    if x.dtype == torch.bfloat16 and interpreting:
        reasons.append("the Triton interpreter cannot compute in bfloat16 (run bfloat16 on a GPU)")
    if not 1 <= rank <= kernels.MAX_RANK:
        reasons.append(f"K={rank} outside 1..{kernels.MAX_RANK}")
    if x.device.type == "cpu" and not interpreting:
        reasons.append(
            "CPU tensors need TRITON_INTERPRET=1 set before attrspace.kernels is imported"
        )
    elif x.device.type == "cuda" and not interpreting:
        capability = _loaded["capability"].get(x.device.index or 0, (0, 0))
        if capability < _MIN_CAPABILITY:
            reasons.append(f"compute capability {capability} < {_MIN_CAPABILITY}")
    elif x.device.type not in ("cpu", "cuda"):
        reasons.append(f"device type {x.device.type!r} (the kernels run on CUDA devices)")
    return reasons


def _forward_launch(
    x: Tensor, weight: Tensor, bias: Tensor | None, V: Tensor, P: Tensor
) -> tuple[Tensor, Tensor]:
    return _kernels().subspace_linear_forward(x, weight, bias, V, P)


def _backward_launch(
    dy: Tensor, weight: Tensor, U: Tensor, Q: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor]:
    dx, g = _kernels().subspace_linear_backward(dy, weight, U, Q, need_dx)
    if dx is None:
        dx = reference.empty_backward_outputs(dy, weight, U, False)[0]
    return dx, g


_forward_op, _backward_op = adapter_custom_ops("triton", _forward_launch, _backward_launch)


def forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, V: Tensor, P: Tensor
) -> tuple[Tensor, Tensor]:
    """y = x W^T + b + z P^T and z = x V in one fused launch; shapes as attrspace.adapters.reference.forward."""
    return _forward_op(x, weight, bias, V, P)


def backward(
    dy: Tensor, weight: Tensor, U: Tensor, Q: Tensor, need_dx: bool
) -> tuple[Tensor | None, Tensor]:
    """dx = dy W + g Q^T and g = dy U in fp32, one fused launch; as attrspace.adapters.reference.backward."""
    dx, g = _backward_op(dy, weight, U, Q, need_dx)
    return (dx if need_dx else None), g


# The whole-layer entry points (functional.SubspaceLinearFn uses them when a backend has them): P and
# Q are formed and dM is reduced inside the fused launches, so a forward is one launch and a backward
# one more (plus autograd's `M.grad +=` when a gradient is already there).
def _forward_factored_launch(
    x: Tensor, weight: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, M: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    return _kernels().subspace_linear_forward_factored(x, weight, bias, U, V, M, scale)


def _backward_factored_launch(
    dy: Tensor, weight: Tensor, U: Tensor, V: Tensor, M: Tensor, z: Tensor, scale: float,
    need_dx: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    dx, _, dm = _kernels().subspace_linear_backward_factored(dy, weight, U, V, M, z, scale, need_dx)
    if dx is None:
        dx = reference.empty_backward_outputs(dy, weight, U, False)[0]
    return dx, dm


_forward_factored_op, _backward_factored_op = factored_custom_ops(
    "triton", _forward_factored_launch, _backward_factored_launch
)


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
    if torch.compiler.is_compiling():
        dx, dm = _backward_factored_op(dy, weight, U, V, M, z, scale, need_dx)
        return (dx if need_dx else None), dm
    dx, _, dm = _kernels().subspace_linear_backward_factored(dy, weight, U, V, M, z, scale, need_dx)
    return dx, dm


# Randomized-SVD steps (attrspace.backends.ops): the batched GEMM and CholeskyQR kernels of
# attrspace.kernels.rsvd; the small SVDs run the torch backend's.


def rsvd_unavailable_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"Triton kernels need a CUDA device, or TRITON_INTERPRET=1 for CPU tensors (got {device})"
    )


def rsvd_matmul(a: Tensor, x: Tensor, transpose: bool) -> Tensor:
    return importlib.import_module(_RSVD_KERNELS).batched_matmul(a, x, transpose_a=transpose)


def rsvd_orthonormalize(y: Tensor, passes: int) -> Tensor:
    rsvd = importlib.import_module(_RSVD_KERNELS)
    if y.shape[-1] > rsvd.MAX_COLS:  # wider than the kernel holds in registers: the torch steps
        return cholesky_qr(y, passes)
    return rsvd.cholesky_qr(y, min(passes, 3))
