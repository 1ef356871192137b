"""Backends of the adapted layer and how one is chosen.

One contract, three implementations, each a module exposing the same five functions:
    unavailable_reason() -> str | None           why it cannot run on this machine (None: it can)
    unsupported_reasons(x, weight, rank) -> list  why it cannot run these inputs (empty: it can)
    forward(x, weight, bias, V, P) -> (y, z)      see attrspace.reference.forward
    backward(dy, weight, U, Q, need_dx) -> (dx, g) see attrspace.reference.backward
- "torch":  attrspace.reference, plain torch on any device; the truth in tests.
- "triton": attrspace._triton_backend over the kernels in attrspace.kernels (CUDA tensors; CPU tensors
            only under TRITON_INTERPRET=1, which is for tests).
- "cuda":   attrspace._cuda_backend over attrspace._C, when it was built with nvcc.
Implementation modules are imported on first use, so `import attrspace` loads neither triton nor _C.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import Tensor

from . import reference

_MODULES = {
    "torch": "attrspace.reference",
    "triton": "attrspace._triton_backend",
    "cuda": "attrspace._cuda_backend",
}
# Order tried by backend="auto" on CUDA tensors. On CPU tensors auto always means "torch": the Triton
# interpreter is a test tool, far slower than torch. Neither kernel backend has been timed on a GPU yet
# (bench/RESULTS.md); until then CUDA goes first because its schedule cannot deadlock whatever order
# the GPU starts blocks in, while the Triton forward relies on blocks starting in program-id order.
_AUTO_ORDER_CUDA = ("cuda", "triton", "torch")


def names() -> tuple[str, ...]:
    return tuple(_MODULES)


# Imported implementations and their availability, filled on first use. torch.compile cannot trace an
# import, so `preload` fills both before any tracing (the adapter modules call it when built); afterwards
# `select` is plain dict lookups and metadata checks, which trace.
_LOADED: dict[str, ModuleType] = {"torch": reference}
_UNAVAILABLE: dict[str, str | None] = {"torch": None}


def implementation(name: str) -> ModuleType:
    """The module implementing backend `name` (imported on first use)."""
    module = _LOADED.get(name)
    if module is None:
        if name not in _MODULES:
            raise ValueError(
                f"unknown backend {name!r}; expected 'auto' or one of {sorted(_MODULES)}"
            )
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


def preload(requested: str) -> None:
    """Import what `select(requested, ...)` may need; raises ValueError for an unknown name."""
    if requested != "auto" and requested not in _MODULES:
        raise ValueError(
            f"unknown backend {requested!r}; expected 'auto' or one of {sorted(_MODULES)}"
        )
    for name in _MODULES if requested == "auto" else (requested,):
        unavailable_reason(name)


def backends() -> dict[str, str]:
    """Every backend mapped to "available" or the reason it is not."""
    return {name: unavailable_reason(name) or "available" for name in _MODULES}


def _reasons(name: str, x: Tensor, weight: Tensor, rank: int) -> list[str]:
    reason = unavailable_reason(name)
    if reason is not None:
        return [reason]
    return implementation(name).unsupported_reasons(x, weight, rank)


def select(requested: str, x: Tensor, weight: Tensor, rank: int) -> str:
    """Name of the backend that runs these inputs.

    An explicit name runs or raises one ValueError with the inputs and every reason; "auto" takes the
    first backend that can run them (never a silent fallback from an explicit choice).
    """
    if requested == "auto":
        if x.device.type != "cuda":
            return "torch"
        for name in _AUTO_ORDER_CUDA:
            if not _reasons(name, x, weight, rank):
                return name
        return "torch"
    if requested not in _MODULES:
        raise ValueError(
            f"unknown backend {requested!r}; expected 'auto' or one of {sorted(_MODULES)}"
        )
    reasons = _reasons(requested, x, weight, rank)
    if reasons:
        shape = (
            f"x {tuple(x.shape)} {x.dtype} on {x.device}, weight {tuple(weight.shape)} {weight.dtype}, "
            f"K={rank}"
        )
        raise ValueError(f"backend {requested!r} cannot run {shape}: " + "; ".join(reasons))
    return requested
