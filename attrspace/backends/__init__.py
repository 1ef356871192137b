"""The backends of the adapted layer, and how one is chosen.

One registry for every kernel family. The ops are declared once in `ops` (the adapter's forward and
backward, the randomized SVD's steps); a backend is one module here that defines them under those
names, with unavailable_reason() (why it cannot run on this machine) and unsupported_reasons(x, weight,
rank) (why it cannot run these inputs); `registry` lists the modules. To add a backend, write the
module and add its name to registry._MODULES. See docs/design.md, "Backends".
Optionally a backend also defines the whole-layer pair (`ops`: forward_factored, backward_factored),
which adapters.functional uses when present, so that a kernel backend forms P, Q and dM inside its own
launches.

The backends here:
- "torch":  torch_backend, plain torch on any device (a folded weight in fp32, one GEMM over the
            concatenated inner dimension in bf16 / fp16).
- "triton": triton_backend over the kernels in attrspace.kernels (CUDA tensors; CPU tensors only
            under TRITON_INTERPRET=1, which is for tests).
- "cuda":   cuda_backend over the compiled extension attrspace._C (`native`) when it was built with
            nvcc, else cupy_jit (the same kernel sources compiled by NVRTC); its randomized-SVD step
            is the extension's batched Jacobi SVD (`jacobi`), built for the CPU as well.

Choosing: an explicit name runs or raises one ValueError with every reason, never a silent fallback.
"auto" is, on CPU tensors, always "torch" (the Triton interpreter is a test tool); on CUDA tensors the
fastest of the backends that can run the inputs, timed once per (device, dtype, d_in, d_out, K, token
bucket) and remembered (`choice`). ATTRSPACE_BACKEND=<name> in the environment makes "auto" mean
that name (an error if it cannot run). Implementation modules are imported on first use, so
`import attrspace` loads neither triton nor _C.

This package is callable: `attrspace.backends()` returns the status of every backend and the
measured choices so far (see status()).
"""

from __future__ import annotations

import sys
import types

import torch
from torch import Tensor

from attrspace.backends import choice
from attrspace.backends.ops import RsvdSteps
from attrspace.backends.registry import (
    _MODULES,
    ENV_FORCE,
    check_forced_name,
    forced_backend,
    implementation,
    names,
    rsvd_steps,
    rsvd_unavailable_reason,
    unavailable_reason,
    unknown,
)

__all__ = [
    "ENV_FORCE",
    "RsvdSteps",
    "Status",
    "auto_rsvd_backend",
    "candidates",
    "check_forced_name",
    "forced_backend",
    "implementation",
    "names",
    "preload",
    "reasons",
    "select",
    "select_rsvd_steps",
    "status",
    "unavailable_reason",
]


def preload(requested: str) -> None:
    """Import what `select(requested, ...)` may need; raises ValueError for an unknown name."""
    if requested != "auto" and requested not in _MODULES:
        raise unknown(requested)
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
            return choice.choose(candidates(x, weight, rank), x, weight, rank)
        requested, origin = forced, f" (forced by {ENV_FORCE})"
    elif requested not in _MODULES:
        raise unknown(requested)
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


def auto_rsvd_backend(device: torch.device) -> str:
    """The backend "auto" picks for the randomized SVD's steps on `device`: "torch", for now.

    CPU: the backends differ only in the small SVDs (24 x 24 float64 and 16 x 16 per operator at rank
    16), 2% of the whole decomposition. For 192 such matrices on one core of the benchmark CPU,
    torch.linalg.svd took 6.3 ms (16 x 16, float32) and 20.4 ms (24 x 24, float64), the extension's
    Jacobi SVD 5.8 and 28.2 ms: no gain worth a dependence on the compiled extension. CUDA: the Triton
    and CUDA kernels have not been timed on a GPU yet (bench/RESULTS.md), so nothing justifies them.
    """
    return "torch"


def select_rsvd_steps(requested: str, device: torch.device) -> RsvdSteps:
    """The randomized-SVD steps of `requested` ("auto" or a backend name) for tensors on `device`;
    ValueError naming why an explicitly requested backend cannot run there."""
    name = auto_rsvd_backend(device) if requested == "auto" else requested
    if name not in _MODULES:
        raise unknown(name)
    reason = rsvd_unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot run the randomized SVD on {device}: {reason}")
    return rsvd_steps(name)


class Status(dict):
    """Every backend mapped to "available" or the reason it is not; `.choices` holds what "auto"
    measured and chose in this process (choice.Choice per key), and str() shows both."""

    def __init__(self, availability: dict[str, str], choices: dict):
        super().__init__(availability)
        self.choices = choices

    def __str__(self) -> str:
        lines = [f"{name:<8}{status}" for name, status in self.items()]
        if self.choices:
            lines.append(
                "auto chose (device dtype d_in d_out K tokens<=bucket: backend, ms per pass):"
            )
            lines += [f"  {choice.describe(key, picked)}" for key, picked in self.choices.items()]
        else:
            lines.append("auto has measured nothing yet in this process")
        return "\n".join(lines)


def status() -> Status:
    """What `attrspace.backends()` returns: availability of every backend and the measured choices."""
    availability = {name: unavailable_reason(name) or "available" for name in _MODULES}
    return Status(availability, choice.choices())


class _CallablePackage(types.ModuleType):
    # `attrspace.backends()` is public (README) and `attrspace.backends` is also this package: a
    # module attribute of the parent cannot be both a function and a submodule (importing the
    # submodule rebinds the name), so the package itself is made callable (module __class__
    # assignment, Python >= 3.5).
    def __call__(self) -> Status:
        return status()


sys.modules[__name__].__class__ = _CallablePackage
