"""The backends of the adapted layer, and how one is chosen.

The contract. A backend is one module in this folder exposing five functions:
    unavailable_reason() -> str | None            why it cannot run on this machine (None: it can)
    unsupported_reasons(x, weight, rank) -> list   why it cannot run these inputs (empty: it can)
    forward(x, weight, bias, V, P) -> (y, z)       x (T, d_in); P = s U M fp32; see reference.forward
    backward(dy, weight, U, Q, need_dx) -> (dx, g) Q = s V M^T fp32; g fp32; see reference.backward
Optionally also the whole-layer pair, which functional.SubspaceLinearFn uses when present (P, Q and
dM formed by the backend itself, so a kernel backend can fold them into its launches):
    forward_factored(x, weight, bias, U, V, M, scale) -> (y, z)
    backward_factored(dy, weight, U, V, M, z, scale, need_dx) -> (dx or None, dM)
Each must match attrspace.reference on fresh random inputs at the dtype's tolerance, and must not
mutate its inputs. To add a backend, write the module and add its name to _MODULES below.

The backends here:
- "torch":  torch_backend, plain torch on any device (a folded weight in fp32, one GEMM over the
            concatenated inner dimension in bf16 / fp16).
- "triton": triton_backend over the kernels in attrspace.kernels (CUDA tensors; CPU tensors only
            under TRITON_INTERPRET=1, which is for tests).
- "cuda":   cuda_backend over attrspace._C when it was built with nvcc, else cupy_jit (the same
            kernel sources compiled by NVRTC).

Choosing: an explicit name runs or raises one ValueError with every reason, never a silent fallback.
"auto" is, on CPU tensors, always "torch" (the Triton interpreter is a test tool); on CUDA tensors the
fastest of the backends that can run the inputs, timed once per (device, dtype, d_in, d_out, K, token
bucket) and remembered (measured.py). ATTRSPACE_BACKEND=<name> in the environment makes "auto" mean
that name (an error if it cannot run). Implementation modules are imported on first use, so
`import attrspace` loads neither triton nor _C.

This package is callable: `attrspace.backends()` returns the status of every backend and the
measured choices so far (see status()).
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import torch
from torch import Tensor

from . import measured, torch_backend

_MODULES = {
    "torch": "attrspace.backends.torch_backend",
    "triton": "attrspace.backends.triton_backend",
    "cuda": "attrspace.backends.cuda_backend",
}
ENV_FORCE = "ATTRSPACE_BACKEND"

# Imported implementations and their availability, filled on first use. torch.compile cannot trace an
# import, so `preload` fills both before any tracing (the adapter modules call it when built);
# afterwards `select` is dict lookups and metadata checks, which trace.
_LOADED: dict[str, types.ModuleType] = {"torch": torch_backend}
_UNAVAILABLE: dict[str, str | None] = {"torch": None}
# ATTRSPACE_BACKEND as last read outside tracing (tracing reads this copy, a constant).
_forced: list[str | None] = [None]


def names() -> tuple[str, ...]:
    return tuple(_MODULES)


def _unknown(name: str, where: str = "backend") -> ValueError:
    return ValueError(f"unknown {where} {name!r}; expected 'auto' or one of {sorted(_MODULES)}")


def implementation(name: str) -> types.ModuleType:
    """The module implementing backend `name` (imported on first use)."""
    module = _LOADED.get(name)
    if module is None:
        if name not in _MODULES:
            raise _unknown(name)
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


def unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run on this machine, else the reason it cannot (cached)."""
    if name not in _UNAVAILABLE:
        try:
            reason = implementation(name).unavailable_reason()
        except ImportError as exc:
            reason = f"its implementation could not be imported ({exc})"
        _UNAVAILABLE[name] = reason
    return _UNAVAILABLE[name]


def forced_backend() -> str | None:
    """The backend ATTRSPACE_BACKEND makes "auto" mean, or None; ValueError for an unknown name."""
    if not torch.compiler.is_compiling():
        value = os.environ.get(ENV_FORCE, "").strip() or None
        if value is not None and value not in _MODULES:
            raise ValueError(
                f"environment variable {ENV_FORCE}={value!r} names no backend; "
                f"expected one of {sorted(_MODULES)} (or unset it)"
            )
        _forced[0] = value
    return _forced[0]


def preload(requested: str) -> None:
    """Import what `select(requested, ...)` may need; raises ValueError for an unknown name."""
    if requested != "auto" and requested not in _MODULES:
        raise _unknown(requested)
    forced_backend()
    for name in _MODULES if requested == "auto" else (requested,):
        unavailable_reason(name)


def reasons(name: str, x: Tensor, weight: Tensor, rank: int) -> list[str]:
    """Every reason backend `name` cannot run these inputs (empty: it can)."""
    reason = unavailable_reason(name)
    if reason is not None:
        return [reason]
    return implementation(name).unsupported_reasons(x, weight, rank)


def candidates(x: Tensor, weight: Tensor, rank: int) -> list[str]:
    """The backends "auto" chooses among for these inputs."""
    if x.device.type != "cuda":
        return ["torch"]
    return [name for name in _MODULES if not reasons(name, x, weight, rank)]


def select(requested: str, x: Tensor, weight: Tensor, rank: int) -> str:
    """Name of the backend that runs these inputs (x: (T, d_in) or (..., d_in))."""
    if requested == "auto":
        forced = forced_backend()
        if forced is None:
            return measured.choose(candidates(x, weight, rank), x, weight, rank)
        requested, origin = forced, f" (forced by {ENV_FORCE})"
    elif requested not in _MODULES:
        raise _unknown(requested)
    else:
        origin = ""
    why = reasons(requested, x, weight, rank)
    if why:
        shape = (
            f"x {tuple(x.shape)} {x.dtype} on {x.device}, weight {tuple(weight.shape)} {weight.dtype}, "
            f"K={rank}"
        )
        raise ValueError(f"backend {requested!r}{origin} cannot run {shape}: " + "; ".join(why))
    return requested


class Status(dict):
    """Every backend mapped to "available" or the reason it is not; `.choices` holds what "auto"
    measured and chose in this process (measured.Choice per key), and str() shows both."""

    def __init__(self, availability: dict[str, str], choices: dict):
        super().__init__(availability)
        self.choices = choices

    def __str__(self) -> str:
        lines = [f"{name:<8}{status}" for name, status in self.items()]
        if self.choices:
            lines.append(
                "auto chose (device dtype d_in d_out K tokens<=bucket: backend, ms per pass):"
            )
            lines += [f"  {measured.describe(key, choice)}" for key, choice in self.choices.items()]
        else:
            lines.append("auto has measured nothing yet in this process")
        return "\n".join(lines)


def status() -> Status:
    """What `attrspace.backends()` returns: availability of every backend and the measured choices."""
    availability = {name: unavailable_reason(name) or "available" for name in _MODULES}
    return Status(availability, measured.choices())


class _CallablePackage(types.ModuleType):
    # `attrspace.backends()` predates this folder; a callable package keeps that call working while
    # `attrspace.backends` is also the package itself (module __class__ assignment, Python >= 3.5).
    def __call__(self) -> Status:
        return status()


sys.modules[__name__].__class__ = _CallablePackage
