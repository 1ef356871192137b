"""The Python steps of bench/gpu_check.sh, one subcommand each, every result one JSON file:

    python bench/gpu_check.py smoke BACKEND OUT.json     one fwd+bwd of BACKEND at the target shape
                                                         against attrspace.adapters.reference (max rel. error)
    python bench/gpu_check.py timings OUT.json           frozen / every backend / LoRA r=16 (ours and
                                                         peft's) fwd+bwd medians, ratios to frozen and
                                                         to the work floor F, TFLOP/s against the
                                                         measured bf16 matmul ceiling, peak memory
    python bench/gpu_check.py svd OUT.json               batched randomized SVD against a per-matrix loop

The shape is VGGT's qkv layer in training, T = 8 x 1369 tokens, 1024 -> 3072, K = 64, bf16, unless
CHECK_T / CHECK_DTYPE say otherwise; on a CPU (tests) the same code runs at any small shape.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import attrspace
from attrspace import backends
from attrspace.adapters import reference
from attrspace.measure.profiling import time_steps
from attrspace.testing import layer_inputs, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (int(os.environ.get("CHECK_T", 8 * 1369)), 1024, 3072, 64)  # T, d_in, d_out, K
DTYPE = getattr(torch, os.environ.get("CHECK_DTYPE", "bfloat16"))
LORA_RANK = 16


def work_floor(d_in: int, d_out: int, rank: int) -> float:
    """Matrix work of the exact design over the frozen layer's: 1 + K (d_in + d_out) / (d_in d_out)."""
    return 1 + rank * (d_in + d_out) / (d_in * d_out)


def smoke(backend: str, shape=SHAPE, dtype=DTYPE, device=DEVICE) -> dict:
    """One forward + backward on `backend`, each output's relative error against the reference."""
    T, d_in, d_out, K = shape
    t = layer_inputs(T, d_in, d_out, K, dtype=dtype, device=device, seed=1)
    why = backends.reasons(backend, t["x"], t["weight"], K)
    if why:  # a backend that cannot run here is reported, not failed
        return {"backend": backend, "shape": list(shape), "dtype": str(dtype), "skipped": why}
    impl = backends.implementation(backend)
    P = 2.0 * t["U"].float() @ t["M"]
    Q = 2.0 * t["V"].float() @ t["M"].t()
    dy = torch.randn(T, d_out, device=device).to(dtype)
    y, z = impl.forward(t["x"], t["weight"], t["bias"], t["V"], P)
    dx, g = impl.backward(dy, t["weight"], t["U"], Q, True)
    y0, z0 = reference.forward(t["x"], t["weight"], t["bias"], t["V"], P)
    dx0, g0 = reference.backward(dy, t["weight"], t["U"], Q, True)
    errors = {
        name: relative_error(a, b)
        for name, a, b in (("y", y, y0), ("z", z, z0), ("dx", dx, dx0), ("g", g, g0))
    }
    return {"backend": backend, "shape": list(shape), "dtype": str(dtype), "errors": errors}


def median_time(step: Callable[[], None], rounds: int = 20) -> float:
    """Median seconds of step() (synchronised), after two warm-up calls."""
    return time_steps(step, rounds, warmup=2, device=torch.device(DEVICE))


def _modules(shape, dtype, device) -> dict[str, nn.Module]:
    _, d_in, d_out, K = shape

    def frozen():
        torch.manual_seed(0)
        return nn.Linear(d_in, d_out, device=device, dtype=dtype).requires_grad_(False)

    out = {"frozen": frozen()}
    U = torch.linalg.qr(torch.randn(d_out, K))[0].to(device, dtype)
    V = torch.linalg.qr(torch.randn(d_in, K))[0].to(device, dtype)
    x = torch.zeros(1, d_in, device=device, dtype=dtype)
    for name in backends.names():
        if not backends.reasons(name, x, frozen().weight, K):
            out[f"subspace K={K} [{name}]"] = attrspace.SubspaceLinear.from_linear(
                frozen(), U, V, scale=2.0, backend=name
            )
    out[f"LoRA r={LORA_RANK}"] = attrspace.LoRALinear.from_linear(
        frozen(), LORA_RANK, 2 * LORA_RANK
    )
    try:
        import peft
    except ImportError:
        return out
    holder = nn.Sequential()
    holder.add_module("layer", frozen())
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["layer"])
    out[f"peft LoRA r={LORA_RANK}"] = peft.get_peft_model(holder, config)
    return out


def timings(shape=SHAPE, dtype=DTYPE, device=DEVICE, timer=median_time) -> dict:
    """fwd + bwd (dx, and the adapter's own gradients) of every method, by `timer`."""
    T, d_in, d_out, K = shape
    x = torch.randn(T, d_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, d_out, device=device, dtype=dtype)
    rows = {}
    for name, module in _modules(shape, dtype, device).items():

        def step(module=module):
            x.grad = None
            module(x).backward(dy)

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        seconds = timer(step)
        peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
        rows[name] = {"ms": seconds * 1e3, "peak_bytes": peak}
    a = torch.randn(T, d_in, device=device, dtype=dtype)
    w = torch.randn(d_out, d_in, device=device, dtype=dtype)
    ceiling_s = timer(lambda: a @ w.t())
    matmul_flops = 2 * T * d_in * d_out
    frozen_ms = rows["frozen"]["ms"]
    floor = work_floor(d_in, d_out, K)
    for r in rows.values():
        r["x_frozen"] = r["ms"] / frozen_ms
        r["x_frozen_over_F"] = r["x_frozen"] / floor
        # fwd + dx of the frozen layer are two matmuls of the layer's size
        r["tflops_frozen_work"] = 2 * matmul_flops / (r["ms"] * 1e-3) / 1e12
    return {
        "shape": list(shape),
        "dtype": str(dtype),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "work_floor_F": floor,
        "matmul_ceiling_tflops": matmul_flops / ceiling_s / 1e12,
        "rows": rows,
        "auto": str(attrspace.backends()),
    }


def svd(device=DEVICE, batch: int = 48, size=(1024, 1024), rank: int = 64, timer=median_time):
    """attrspace.linalg's randomized SVD of `batch` matrices in one call against one call per matrix
    (the same algorithm, unbatched)."""
    from attrspace.linalg.randomized import randomized_svd

    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(batch, *size, generator=g).to(device)
    ops = list(a)
    batched = timer(lambda: randomized_svd(ops, rank), rounds=3)
    loop = timer(lambda: [randomized_svd([m], rank) for m in ops], rounds=3)
    return {"batch": batch, "size": list(size), "rank": rank, "batched_ms": batched * 1e3,
            "loop_ms": loop * 1e3, "speedup": loop / batched}  # fmt: skip


def main(argv: list[str]) -> int:
    command, *rest = argv
    if command == "smoke":
        result, path = smoke(rest[0]), rest[1]
    elif command == "timings":
        result, path = timings(), rest[0]
    elif command == "svd":
        result, path = svd(), rest[0]
    else:
        raise SystemExit(f"unknown step {command!r}; expected smoke, timings or svd")
    Path(path).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
