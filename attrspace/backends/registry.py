"""The registry of backends: their names (one vocabulary for every kernel family), their modules
(imported on first use, so `import attrspace` loads neither triton nor attrspace._C), and why one
cannot run here. The choice among them lives in the package's __init__ and in `choice`."""

from __future__ import annotations

import importlib
import os
import types

import torch

from attrspace.backends import torch_backend
from attrspace.backends.ops import RSVD_OPS, RsvdSteps

# Order matters: under torch.compile an unmeasured layer takes the first candidate.
_MODULES = {
    "torch": "attrspace.backends.torch_backend",
    "triton": "attrspace.backends.triton_backend",
    "cuda": "attrspace.backends.cuda_backend",
}
ENV_FORCE = "ATTRSPACE_BACKEND"

# Imported implementations and their availability, filled on first use. torch.compile cannot trace an
# import, so `attrspace.backends.preload` fills both before any tracing (the adapter modules call it
# when built); afterwards selection is dict lookups and metadata checks, which trace.
_LOADED: dict[str, types.ModuleType] = {"torch": torch_backend}
_UNAVAILABLE: dict[str, str | None] = {"torch": None}
# ATTRSPACE_BACKEND as last read outside tracing (tracing reads this copy, a constant).
_forced: list[str | None] = [None]


def names() -> tuple[str, ...]:
    return tuple(_MODULES)


def unknown(name: str, where: str = "backend") -> ValueError:
    return ValueError(f"unknown {where} {name!r}; expected 'auto' or one of {sorted(_MODULES)}")


def implementation(name: str) -> types.ModuleType:
    """The module implementing backend `name` (imported on first use)."""
    module = _LOADED.get(name)
    if module is None:
        if name not in _MODULES:
            raise unknown(name)
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


def unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run its adapter ops on this machine, else why not (cached)."""
    if name not in _UNAVAILABLE:
        try:
            reason = implementation(name).unavailable_reason()
        except ImportError as exc:
            reason = f"its implementation could not be imported ({exc})"
        _UNAVAILABLE[name] = reason
    return _UNAVAILABLE[name]


def check_forced_name(value: str | None) -> str | None:
    """`value` of ATTRSPACE_BACKEND, checked: None when unset, ValueError naming the valid names."""
    value = (value or "").strip() or None
    if value is not None and value not in _MODULES:
        raise ValueError(
            f"environment variable {ENV_FORCE}={value!r} names no backend; "
            f"expected one of {sorted(_MODULES)} (or unset it)"
        )
    return value


def forced_backend() -> str | None:
    """The backend ATTRSPACE_BACKEND makes "auto" mean, or None; ValueError for an unknown name."""
    if not torch.compiler.is_compiling():
        _forced[0] = check_forced_name(os.environ.get(ENV_FORCE))
    return _forced[0]


def rsvd_unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run its randomized-SVD steps on `device`, else why not."""
    module = implementation(name)
    check = getattr(module, "rsvd_unavailable_reason", None)
    if check is None:
        return None if name == "torch" else unavailable_reason(name)
    try:
        return check(device)
    except ImportError as exc:
        return f"its implementation could not be imported ({exc})"


def rsvd_steps(name: str) -> RsvdSteps:
    """Backend `name`'s randomized-SVD steps, the torch backend's where it defines none."""
    module = implementation(name)
    found = [getattr(module, op, None) or getattr(torch_backend, op) for op in RSVD_OPS]
    return RsvdSteps(name, *found)
