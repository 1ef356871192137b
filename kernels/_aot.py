"""Ahead-of-time compiles of the Triton kernels for a GPU that is not here, and what ptxas says of them.

triton.compile with a GPUTarget runs the whole pipeline down to SASS on a CPU-only machine (Triton's
bundled ptxas). For each compile this reports the PTX target, the MMA instructions in the PTX (wgmma
on sm_90a, mma.sync on sm_80), registers, spill bytes (ptxas -v), dynamic shared memory against the
architecture's limit, and SASS instructions per tensor-core MMA. The tests (tests/kernels/test_static.py)
and bench/RESULTS.md read these figures.

Must run with TRITON_INTERPRET unset (an interpreted @triton.jit has no compiler); `python -m
attrspace.kernels._aot` prints every figure as JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

# Per-block dynamic shared memory an SM can give one program (CUDA programming guide, table of
# compute capabilities): 227 KiB on sm_90, 163 KiB on sm_80 (A100).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = (90, 80)


@dataclass
class Figures:
    kernel: str
    arch: int
    config: str
    target: str  # the PTX .target line, e.g. sm_90a
    wgmma: int  # wgmma.mma_async in the PTX
    mma_sync: int  # mma.sync in the PTX
    registers: int
    spill_stores: int  # bytes, ptxas -v
    spill_loads: int
    shared: int  # bytes of dynamic shared memory
    shared_limit: int
    sass: int  # SASS instructions of the kernel
    sass_mma: int  # tensor-core MMAs among them (HGMMA, HMMA, DMMA, ...)
    tma_loads: int  # UTMALDG among them (bulk tensor copies through descriptors)
    local_memory: int  # LDL / STL among them (spills, or arrays ptxas put in local memory)
    # ptxas info C7510: wgmma.mma_async serialized (each one waited for before the next issues),
    # for instance where a wgmma pipeline would cross a function call or a loop it cannot follow
    wgmma_serialized: bool


def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _specialise(fn, types: dict[str, str], values: dict[str, int], constexprs: dict):
    """Signature, constants and attributes as a launch with these argument values would give them:
    Triton makes an integer argument equal to 1 a constant and marks one divisible by 16 (and every
    pointer: torch allocations are aligned) with tt.divisibility 16, which decides vector widths."""
    constants = dict(constexprs)
    constants.update({k: 1 for k, v in values.items() if v == 1})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            sig[name] = "constexpr"
            continue
        sig[name] = types.get(name, "i32")
        pointer = sig[name].startswith("*")
        if pointer or (sig[name] == "i32" and name in values and values[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [n for n, t in sig.items() if t == "i32" and n not in values]
    if missing:
        raise ValueError(f"{fn.__name__}: no value given for integer arguments {missing}")
    return sig, {(fn.arg_names.index(k),): v for k, v in constants.items()}, attrs


def _jit_function(kernel: str):
    """The JITFunction of `kernel` ("module:function" under attrspace.kernels)."""
    import importlib

    import triton

    module, name = kernel.split(":")
    jit = getattr(importlib.import_module(f"attrspace.kernels.{module}"), name)
    fn = jit if isinstance(jit, triton.runtime.jit.JITFunction) else getattr(jit, "fn", None)
    if not isinstance(fn, triton.runtime.jit.JITFunction):  # under @triton.autotune: jit.fn
        raise RuntimeError(f"{kernel} is interpreted (TRITON_INTERPRET=1); compile it without")
    return fn


def _compile(src, warps: int, stages: int, arch: int):
    """(compiled kernel, its SASS text, the ptxas -v log) of one ahead-of-time compile."""
    import triton
    from triton.backends.compiler import GPUTarget

    log = io.StringIO()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: ptxas runs and its log is printed
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": warps, "num_stages": stages},
            )
        cubin = Path(cache) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run(
            [_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    return compiled, sass, log.getvalue()


def compile_one(
    kernel: str,
    types: dict,
    values: dict,
    constexprs: dict,
    warps: int,
    stages: int,
    arch: int,
    label: str = "",
) -> Figures:
    """Compile `kernel` ("module:function" under attrspace.kernels) for sm_<arch> and read it.
    types: Triton types of the pointer and float arguments ("*bf16", "fp32"); the rest are i32,
    specialised on `values`, their values at a representative launch (see _specialise)."""
    from triton.compiler import ASTSource

    fn = _jit_function(kernel)
    signature, constants, attrs = _specialise(fn, types, values, constexprs)
    src = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    compiled, sass, text = _compile(src, warps, stages, arch)
    ptx = compiled.asm["ptx"]

    def number(pattern: str, combine=sum) -> int:
        # over every function ptxas reports (the kernel and any function it calls)
        found = re.findall(pattern, text)
        if not found:
            raise RuntimeError(f"ptxas -v output of {kernel} lacks {pattern!r}:\n{text}")
        return combine(int(v) for v in found)

    instructions = re.findall(
        r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?(\S+)", sass, re.MULTILINE
    )
    config = " ".join(f"{k}={v}" for k, v in constexprs.items()) + f" warps={warps} stages={stages}"
    config = f"{label} {config}" if label else config
    return Figures(
        kernel=kernel,
        arch=arch,
        config=config,
        target=re.search(r"^\.target (\S+)", ptx, re.MULTILINE).group(1),
        wgmma=ptx.count("wgmma.mma_async"),
        mma_sync=ptx.count("mma.sync"),
        registers=number(r"Used (\d+) registers", max),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        shared=int(compiled.metadata.shared),
        shared_limit=SHARED_LIMIT[arch],
        sass=len(instructions),
        sass_mma=sum(1 for op in instructions if re.match(r"(HGMMA|HMMA|IMMA|QGMMA|DMMA)", op)),
        tma_loads=sum(1 for op in instructions if op.startswith("UTMALDG")),
        local_memory=sum(1 for op in instructions if re.match(r"(LDL|STL)\b", op)),
        wgmma_serialized="wgmma.mma_async instructions are serialized" in text,
    )


_T, _R, _N, _K = 8 * 1369, 1024, 3072, 64
_FORWARD_VALUES = {
    "T": _T, "R": _R, "N": _N, "K": _K, "T_BUCKET": 16384,
    "stride_at": _R, "stride_ar": 1, "stride_br": 1, "stride_bn": _R, "stride_cr": _K,
    "stride_ck": 1, "stride_en": _K, "stride_ek": 1, "stride_bias": 1,
    "stride_fn": _K, "stride_fk": 1, "stride_mk": _K, "stride_mj": 1,
}  # fmt: skip
# The backward of the same layer: A = dy (T, 3072), B = W (3072, 1024) read row-major, C = U, E = Q.
_BACKWARD_VALUES = {
    **_FORWARD_VALUES, "R": _N, "N": _R, "stride_at": _N, "stride_br": _R, "stride_bn": 1,
    "stride_bias": 0, "stride_mk": 1, "stride_mj": _K,
}  # fmt: skip
# The backward when only g is needed (dx not asked for): no output columns, only side programs.
_G_ONLY_VALUES = {**_BACKWARD_VALUES, "N": 0}

# (name, dtype, base precision, forward adapter precision, backward adapter precision): the
# launchers' defaults (subspace_linear._DEFAULT_ADAPTER_PRECISION); g is fp32 in every dtype, so the
# backward's "input" precision rounds it to bf16 where the forward rounds z.
_DTYPES = (
    ("bf16", "bfloat16", "tf32", "input"),
    ("fp16", "float16", "tf32", "tf32"),
    ("fp32", "float32", "ieee", "ieee"),
)


def _tma_types(name: str, arch: int, pass_name: str, c: dict) -> dict[str, str]:
    """The tensor-descriptor arguments a launch passes where subspace_linear._descriptors makes them:
    on sm_90, with output columns, and C tile rows of at most 128 B (so not fp32 at K_PAD 64)."""
    width = {"bf16": 2, "fp16": 2, "fp32": 4}[name]
    if arch < 90 or pass_name == "g_only" or c["K_PAD"] * width > 128:
        return {}
    bm, bn, br = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_R"]
    b_tile = [bn, br] if pass_name == "forward" else [br, bn]
    tiles = {"a_desc": [bm, br], "b_desc": b_tile, "c_desc": [br, c["K_PAD"]]}
    return {k: f"tensordesc<{name}[{v[0]},{v[1]}]>" for k, v in tiles.items()}


def _fused_jobs() -> list[tuple]:
    """Every autotune config of the fused subspace-linear kernel that the autotuner tries on each
    target (kernels/_config.configs_for), in bf16, fp16 and fp32 at K_PAD 64, in each of the three
    specialisations a training step launches: the forward (bias, side z in the input dtype), the
    backward (no bias, side g in fp32, dM reduced in the launch) and the g-only backward (no output
    columns); P and Q are formed by the launch's first programs in all three (FACTOR)."""
    import torch

    from ._config import configs_for

    jobs = []
    for name, dtype_name, precision, adapter in _DTYPES:
        dtype = getattr(torch, dtype_name)
        forward = {
            p: f"*{name}" for p in ("a_ptr", "b_ptr", "c_ptr", "f_ptr", "bias_ptr", "out_ptr")
        }
        forward.update(
            e_ptr="*fp32", m_ptr="*fp32", side_ptr=f"*{name}", zs_ptr=f"*{name}",
            part_ptr="*fp32", dm_ptr="*fp32", sched_ptr="*i32", scale="fp32",
        )  # fmt: skip
        backward = {**forward, "side_ptr": "*fp32"}
        g_only = {**backward, "out_ptr": "*fp32"}
        passes = (
            ("forward", forward, _FORWARD_VALUES, True, False),
            ("backward", backward, _BACKWARD_VALUES, False, True),
            ("g_only", g_only, _G_ONLY_VALUES, False, True),
        )
        for arch in ARCHS:
            for pass_name, pointers, values, bias, grad_m in passes:
                configs = configs_for(dtype, (arch // 10, arch % 10))
                for c in configs[:1] if pass_name == "g_only" else configs:
                    constexprs = {
                        "K_PAD": 64,
                        "HAS_BIAS": bias,
                        "FACTOR": True,
                        "GRAD_M": grad_m,
                        "PRECISION": precision,
                        "ADAPTER_PRECISION": adapter,
                        # as subspace_linear._dm_precision: exact products with wgmma and in fp32
                        "DM_PRECISION": "ieee" if arch >= 90 else precision,
                        **c.kwargs,
                    }
                    types = {**pointers, **_tma_types(name, arch, pass_name, constexprs)}
                    for desc in ("a_desc", "b_desc", "c_desc"):
                        if desc not in types:
                            constexprs[desc] = None
                    constexprs["TMA"] = "a_desc" in types
                    constexprs["B_ROWS_ARE_N"] = pass_name == "forward"
                    constexprs["PERSISTENT"] = pass_name != "g_only"  # as _launch: N > 0
                    jobs.append(
                        ("subspace_linear:_fused_kernel", types, values, constexprs,
                         c.num_warps, c.num_stages, arch, pass_name)
                    )  # fmt: skip
    return jobs


def _rsvd_jobs() -> list[tuple]:
    from .rsvd import STATIC_CONFIGS

    return [(*job, arch) for job in STATIC_CONFIGS for arch in ARCHS]


def all_figures(workers: int = 2) -> list[Figures]:
    """Figures of every job, compiled in `workers` processes (the compiles are CPU-bound)."""
    jobs = _fused_jobs() + _rsvd_jobs()
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_run, jobs))


def _run(job: tuple) -> Figures:
    return compile_one(*job)


def report(workers: int) -> dict:
    """Every figure, and how many fused-kernel configs each target's autotuner tries (bf16)."""
    import torch

    from ._config import TENSOR_CORE_CONFIGS, configs_for

    return {
        "configs": len(TENSOR_CORE_CONFIGS),
        "tried_bf16": {str(a): len(configs_for(torch.bfloat16, (a // 10, a % 10))) for a in ARCHS},
        "figures": [asdict(f) for f in all_figures(workers)],
    }


if __name__ == "__main__":
    print(json.dumps(report(os.cpu_count() or 1), indent=1))
