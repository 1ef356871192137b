"""The CUDA kernels compiled at run time by cupy (NVRTC), for an extension built without nvcc.

The kernel headers csrc/subspace_linear_*.cuh hold device code only, so NVRTC compiles the same text nvcc
does. They are read from attrspace/_csrc (a wheel: CMakeLists.txt installs them there) or from csrc/ of
the source checkout (an editable install), concatenated into one translation unit (so cupy's compile
cache keys on their full text), and compiled once per device. The grid of a launch depends on the tile
sizes, which are read from that same text, so the launcher and the kernels cannot disagree.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
from pathlib import Path

import torch

# In include order: each header includes only headers listed before it.
HEADERS = (
    "subspace_linear_ptx.cuh",
    "subspace_linear_common.cuh",
    "subspace_linear_simt.cuh",
    "subspace_linear_tc.cuh",
    "subspace_linear_kernels.cuh",
)
_LOCAL_INCLUDE = re.compile(r'^#include "subspace_linear_\w+\.cuh"$|^#pragma once$', re.MULTILINE)
_CONSTANT = re.compile(r"^constexpr int (k\w+) = (\d+);", re.MULTILINE)


def source_dir() -> Path | None:
    """The folder holding the kernel headers, or None when they are not installed."""
    package = Path(__file__).resolve().parent.parent  # attrspace/
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in HEADERS):
            return candidate
    return None


@functools.cache
def kernel_source() -> str:
    """The kernel headers as one self-contained translation unit."""
    folder = source_dir()
    if folder is None:
        raise FileNotFoundError(
            f"the kernel headers {HEADERS} were found neither in attrspace/_csrc nor csrc/"
        )
    parts = [_LOCAL_INCLUDE.sub("", (folder / name).read_text()) for name in HEADERS]
    return "\n".join(parts)


@functools.cache
def tile_constants() -> dict[str, int]:
    """The integer constants of the kernel text (kThreads, kTcBlockM, ...)."""
    return {name: int(value) for name, value in _CONSTANT.findall(kernel_source())}


@functools.cache
def unavailable_reason() -> str | None:
    """None when cupy can compile and launch the kernels here, else why not."""
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed"
    if source_dir() is None:
        return "the kernel headers (csrc/subspace_linear_*.cuh) are not installed"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy raises its own CUDARuntimeError types, or ImportError
        return f"cupy cannot reach a CUDA device ({type(exc).__name__}: {exc})"
    return None if count > 0 else "cupy found no CUDA device"


def cuda_include_dirs() -> list[str]:
    """Folders holding cuda_bf16.h for NVRTC: a CUDA toolkit or the pip wheels of the CUDA headers.

    cupy finds them itself in most setups; naming them explicitly covers a toolkit that cupy's own
    search misses (cuda_bf16.h is not bundled with cupy for CUDA 12.2+).
    """
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:  # <toolkit>/bin/nvcc
        roots.append(str(Path(nvcc).resolve().parent.parent))
    candidates = [Path(root) / "include" for root in roots if root]
    nvidia = importlib.util.find_spec("nvidia")  # the pip wheels of the CUDA toolkit
    locations = list(nvidia.submodule_search_locations or []) if nvidia is not None else []
    for location in locations:
        candidates.append(Path(location) / "cuda_runtime" / "include")
        candidates.append(Path(location) / "cu13" / "include")
    found: list[str] = []
    for folder in candidates:
        if (folder / "cuda_bf16.h").is_file() and str(folder) not in found:
            found.append(str(folder))
    return found


@functools.cache
def _module(device_index: int):
    import cupy

    options = ("--std=c++17", *(f"-I{folder}" for folder in cuda_include_dirs()))
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=kernel_source(), options=options)


def grid_size(
    dtype: torch.dtype, tokens: int, n: int, rank: int, with_output: bool, with_factor: bool = False
) -> int:
    """Blocks of one launch, as the kernels expect: the factor tiles (one per output column tile,
    when E is formed in the launch), then row blocks x (projection tiles + output tiles)."""
    c = tile_constants()
    family = "Simt" if dtype == torch.float32 else "Tc"
    block_m, block_n = c[f"k{family}BlockM"], c[f"k{family}BlockN"]
    n_out = -(-n // block_n) if with_output else 0
    n_factor = n_out if with_factor else 0
    return n_factor + -(-tokens // block_m) * (-(-rank // block_n) + n_out)


def launch(
    name: str,
    pointers: tuple[int, ...],
    sizes: tuple[int, int, int, int],
    scale: float,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Launch entry point `name` on torch's current stream of `device`.

    pointers: the 14 device addresses (a, b_main, b_proj, bias, e, out, proj32, proj, schedule,
    factor, core, side, dm, part; 0 for null), sizes (m, n, kd, rank) and the scale, as in
    FusedGemmArgs. The schedule (ninth address) must be all zero; the launch leaves it zero.
    """
    import cupy
    import numpy as np

    m, n, _, rank = sizes
    blocks = grid_size(dtype, m, n, rank, pointers[5] != 0, pointers[9] != 0)
    args = (
        tuple(np.uint64(p) for p in pointers)
        + tuple(np.int64(s) for s in sizes)
        + (np.float32(scale),)
    )
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = _module(index).get_function(name)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        kernel((blocks,), (tile_constants()["kThreads"],), args)
