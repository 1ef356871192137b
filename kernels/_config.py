"""Block sizes of the fused subspace-linear kernels, and whether they run interpreted.

The fused kernel (kernels/subspace_linear.py) works two kinds of tickets with the same BLOCK_M / BLOCK_R:
side tickets (BLOCK_M x K_PAD tiles of z = x V or g = dy U) and output tickets (BLOCK_M x BLOCK_N tiles
of y or dx), on a persistent grid of PROGRAMS_PER_SM programs per SM. Every GPU config that configs_for
keeps is compiled for sm_80 and sm_90a with Triton 3.7 and ptxas in CI (tests/kernels/test_static.py, no
GPU needed): at K_PAD = 64 all are software-pipelined (cp.async, TMA and wgmma on sm_90a) without
register spills;
128 x 256 x 64 with 3 stages takes 144 KiB of shared memory on sm_90 and 96 KiB on sm_80. Where a config
does not fit a device (fp16 at K_PAD = 128 and 128 x 256 needs 192 KiB on sm_80, over an A100's 164 KiB)
it fails to launch and the autotuner skips it; the last config fits everywhere.
"""

from __future__ import annotations

import os

import torch
import triton

# Read once, like @triton.jit itself reads it when the kernels are decorated (style.md 6.2): a later
# change of the variable does not turn already-decorated kernels into interpreted ones.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# ATTRSPACE_TRITON_CONFIGS=one: the autotuner keeps only the first config that fits (bench/gpu_check.sh
# runs the GPU tests so, where every ragged test shape would otherwise compile and time every config).
ONE_CONFIG = os.environ.get("ATTRSPACE_TRITON_CONFIGS", "all") == "one"

# The autotuner keys on the problem's (R, N, K_PAD, T_BUCKET) and the tensor dtypes.
AUTOTUNE_KEY = ["R", "N", "K_PAD", "T_BUCKET"]


# ATTRSPACE_TRITON_TMA: "auto" (tensor descriptors on sm_90 and newer), "on" (wherever the operands
# allow, the interpreter included: how the CPU tests cover that path) or "off".
TMA_MODE = os.environ.get("ATTRSPACE_TRITON_TMA", "auto")
if TMA_MODE not in ("auto", "on", "off"):
    raise ValueError(f"ATTRSPACE_TRITON_TMA must be auto, on or off, got {TMA_MODE!r}")


def set_tma_blocks(nargs: dict) -> None:
    """Config pre-hook: the tensor descriptors' tiles for this config (no-op without TMA)."""
    if nargs.get("a_desc") is None:
        return
    block_m, block_n, block_r = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_R"]
    nargs["a_desc"].block_shape = [block_m, block_r]
    transposed = nargs["B_ROWS_ARE_N"]
    nargs["b_desc"].block_shape = [block_n, block_r] if transposed else [block_r, block_n]
    nargs["c_desc"].block_shape = [block_r, nargs["K_PAD"]]


def _config(
    block_m: int, block_n: int, block_r: int, group_m: int, warps: int, stages: int, per_sm: int
):  # fmt: skip
    """per_sm: programs per SM of the persistent grid, as many as fit on one SM at once on sm_90a
    and sm_80 by the compiles' registers and shared memory (tests/kernels/test_static.py checks)."""
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_R": block_r, "GROUP_M": group_m}
    meta["PROGRAMS_PER_SM"] = per_sm
    return triton.Config(meta, num_warps=warps, num_stages=stages, pre_hook=set_tma_blocks)


if INTERPRET:
    # One config: the interpreter would otherwise benchmark every config. Blocks of 32 keep the test
    # shapes (T=37, d_in=100, d_out=72) ragged in every dimension, and GROUP_M=2 makes a 3-row-block
    # problem span two program groups, the last one partial.
    TENSOR_CORE_CONFIGS = FP32_CONFIGS = [
        _config(32, 32, 32, group_m=2, warps=4, stages=1, per_sm=1)
    ]
else:
    TENSOR_CORE_CONFIGS = [  # bf16 / fp16
        # Large tiles for T = frames x 1369 tokens and d >= 1024 (the VGGT layers): 128 x 256 halves the
        # re-reads of x per output column against 128 x 128; 8 warps hold the 128 x 256 fp32 accumulator.
        _config(128, 256, 64, group_m=8, warps=8, stages=3, per_sm=1),
        _config(128, 128, 64, group_m=8, warps=8, stages=4, per_sm=1),
        # More programs for short T (a single frame) and narrow layers, so every SM gets work.
        # 8 warps: with 4, the backward's bf16 specialisation (fp32 g rounded for the adapter term)
        # spills 76 B per thread on sm_80 at 255 registers; 8 take 150 (ptxas, Triton 3.7.1).
        _config(64, 128, 64, group_m=8, warps=8, stages=4, per_sm=1),
        # 2 per SM: 196 registers on sm_80 leave room for 10 warps (sm_90a: 168, 3 programs)
        _config(64, 64, 32, group_m=8, warps=4, stages=3, per_sm=2),
    ]
    # fp32 multiplies on the FMA units ("ieee"): beyond 64 x 64 the accumulator spills, and with 4
    # warps even 64 x 64 spills 96-128 B per thread (ptxas, sm_80 / sm_90a); 8 warps fit in 128.
    FP32_CONFIGS = [_config(64, 64, 32, group_m=8, warps=8, stages=3, per_sm=1)]
CONFIGS = TENSOR_CORE_CONFIGS + [c for c in FP32_CONFIGS if c not in TENSOR_CORE_CONFIGS]


def configs_for(dtype: torch.dtype, capability: tuple[int, int]) -> list:
    """The configs worth timing for inputs of `dtype` on a GPU of compute `capability`: fp32 its own
    (FP32_CONFIGS); bf16 / fp16 every tensor-core config, except the 128 x 256 tile before Hopper,
    which spills there (ptxas for sm_80: 16 B per thread in bf16, 228 B in fp16 with its tf32
    adapter term; it takes wgmma's register-free operands to fit). tests/kernels/test_static.py
    compiles exactly these.
    """
    if dtype == torch.float32:
        return FP32_CONFIGS
    if capability < (9, 0):
        return [c for c in TENSOR_CORE_CONFIGS if c.kwargs["BLOCK_N"] < 256]
    return TENSOR_CORE_CONFIGS


def prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Autotuner hook: configs_for the arguments' dtype and device."""
    a = named_args["a_ptr"]
    capability = torch.cuda.get_device_capability(a.device) if a.is_cuda else (9, 0)
    keep = configs_for(a.dtype, capability)[: 1 if ONE_CONFIG else None]
    return [c for c in configs if c in keep] or configs[-1:]


# No config has fewer row blocks than cdiv(T, MIN_BLOCK_M), so that many ready flags serve every config.
MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in CONFIGS)
# ... and cdiv(N, MIN_BLOCK_N) column flags.
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in CONFIGS)


# Host-side integer helpers for the launchers. triton.cdiv and triton.next_power_of_2 are constexpr
# functions in Triton 3.7, whose host-side call unwraps every argument: a few microseconds each, on
# every launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1."""
    return 1 << max(n - 1, 0).bit_length()
