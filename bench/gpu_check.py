"""The Python steps of bench/gpu_check.sh, one subcommand each, every result one JSON file:

    python bench/gpu_check.py smoke BACKEND OUT.json     one fwd+bwd of BACKEND at the target shape
                                                         against attrspace.adapters.reference (max rel. error)
    python bench/gpu_check.py timings OUT.json           frozen / every backend / LoRA r=16 (ours and
                                                         peft's) fwd+bwd: CUDA events over back-to-back
                                                         steps, and CUDA-graph replay; ratios to frozen
                                                         and to the work floor F, TFLOP/s against the
                                                         measured bf16 matmul ceiling, peak memory
    python bench/gpu_check.py svd OUT.json               batched randomized SVD against a per-matrix loop
    python bench/gpu_check.py summary DIR OUT.json       the lines of summary.txt from DIR's results,
                                                         and all of them merged into OUT.json

The shape is VGGT's qkv layer in training, T = 8 x 1369 tokens, 1024 -> 3072, K = 64, bf16, unless
CHECK_T / CHECK_DTYPE say otherwise; on a CPU (tests, the dry run) the same code runs at small shapes.
Per-step wall clock around a synchronize would add 150-270 us of Python per step on the GPU, so device
time is taken with CUDA events around ROUNDS back-to-back steps (the host runs ahead) and by replaying a
captured CUDA graph of one step (no host work at all).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from peft_import import import_peft
from torch import nn

import attrspace
from attrspace import backends
from attrspace.adapters import reference
from attrspace.measure import lineup
from attrspace.measure.profiling import time_steps
from attrspace.testing import layer_inputs, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (int(os.environ.get("CHECK_T", 8 * 1369)), 1024, 3072, 64)  # T, d_in, d_out, K
DTYPE = getattr(torch, os.environ.get("CHECK_DTYPE", "bfloat16"))
LORA_RANK = 16
ROUNDS = int(os.environ.get("CHECK_ROUNDS", 20))


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


def median_time(step: Callable[[], None], rounds: int = ROUNDS) -> float:
    """Seconds per step(): on CUDA the median over 5 batches of `rounds` back-to-back steps, each
    batch between two CUDA events; on the CPU the median wall time of single steps."""
    if DEVICE != "cuda":
        return time_steps(step, rounds, warmup=2, device=torch.device("cpu"))
    for _ in range(3):
        step()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(rounds):
            step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / rounds)
    return sorted(times)[len(times) // 2]


def graph_time(step: Callable[[], None], rounds: int = ROUNDS) -> float | str:
    """Seconds per replay of a CUDA graph holding one step(), by CUDA events (median of 5 batches of
    `rounds` replays); a string saying why when the step cannot be captured (or no GPU)."""
    if DEVICE != "cuda":
        return "no CUDA device"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # autotuning, lazy allocations and measured choices happen here
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception as exc:  # reported in the results, not fatal
        return f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"
    return median_time(graph.replay, rounds)


def _modules(shape, dtype, device) -> dict[str, nn.Module]:
    """The line-up of attrspace.measure.lineup (same frozen W0 for every kind), the subspace layer once
    per backend that can run it here; peft's LoRA where peft imports."""
    _, d_in, d_out, K = shape

    def layer(kind: str, backend: str = "auto") -> nn.Module:
        return lineup.build_layer(
            kind, d_in, d_out, K, LORA_RANK, backend=backend, dtype=dtype, device=device
        )

    out = {"frozen": layer("frozen")}
    x = torch.zeros(1, d_in, device=device, dtype=dtype)
    for name in backends.names():
        if not backends.reasons(name, x, out["frozen"].weight, K):
            out[f"subspace K={K} [{name}]"] = layer("subspace", name)
    out[f"LoRA r={LORA_RANK}"] = layer("lora")
    try:
        import_peft()
    except ImportError as exc:
        print(f"peft's LoRA is left out: {exc}", file=sys.stderr)
        return out
    out[f"peft LoRA r={LORA_RANK}"] = layer("peft")
    return out


def timings(
    shape=SHAPE, dtype=DTYPE, device=DEVICE, timer=median_time, graph_timer=graph_time
) -> dict:
    """fwd + bwd (dx, and the adapter's own gradients) of every method, by `timer` (events over
    back-to-back steps) and `graph_timer` (CUDA-graph replay)."""
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
        replay = graph_timer(step)
        graph_ms = replay * 1e3 if isinstance(replay, float) else None
        rows[name] = {"ms": seconds * 1e3, "graph_ms": graph_ms, "peak_bytes": peak}
        if graph_ms is None:
            rows[name]["graph_note"] = replay
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


_SVD_BATCH = int(os.environ.get("CHECK_SVD_BATCH", 48))
_SVD_SIZE = int(os.environ.get("CHECK_SVD_SIZE", 1024))


def svd(
    device=DEVICE,
    batch: int = _SVD_BATCH,
    size=(_SVD_SIZE, _SVD_SIZE),
    rank: int = min(64, _SVD_SIZE // 2),
    timer=median_time,
):
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


def summary_lines(results: dict) -> list[str]:
    """The figures part of summary.txt, from {file stem: result} of one run."""
    lines = []
    for name, r in sorted(results.items()):
        if not name.startswith("smoke_"):
            continue
        if "skipped" in r:
            lines.append(f"smoke {r['backend']:<7} cannot run here: " + "; ".join(r["skipped"]))
        else:
            errors = ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
            lines.append(f"smoke {r['backend']:<7} max rel. error {errors}")
    if "timings" in results:
        t = results["timings"]
        lines.append(
            f"timings {t['device']} {t['dtype']} T,d_in,d_out,K={t['shape']} "
            f"F={t['work_floor_F']:.3f} matmul ceiling {t['matmul_ceiling_tflops']:.0f} TFLOP/s"
        )
        frozen_graph = t["rows"]["frozen"].get("graph_ms")
        for name, r in t["rows"].items():
            peak = f"{r['peak_bytes'] / 2**20:.0f} MiB" if r["peak_bytes"] is not None else "-"
            graph = "graph -"
            if r.get("graph_ms") is not None and frozen_graph:
                graph = f"graph {r['graph_ms']:.3f} ms {r['graph_ms'] / frozen_graph:.3f}x"
            lines.append(
                f"  {name:<26} {r['ms']:8.3f} ms {r['x_frozen']:.3f}x frozen "
                f"{r['x_frozen_over_F']:.3f}x F*frozen {r['tflops_frozen_work']:.0f} TFLOP/s "
                f"{graph} peak {peak}"
            )
        lines.append(t["auto"])
    if "svd" in results:
        s = results["svd"]
        lines.append(
            f"svd {s['batch']} x {s['size']} rank {s['rank']}: batched {s['batched_ms']:.1f} ms, "
            f"loop {s['loop_ms']:.1f} ms, {s['speedup']:.1f}x"
        )
    return lines


def summary(folder: Path, merged: Path) -> list[str]:
    """Read every result JSON in `folder` (a file that does not parse is named, not fatal), write
    them merged into `merged`, and return the summary lines."""
    results, lines = {}, []
    for f in sorted(folder.glob("*.json")):
        try:
            results[f.stem] = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            lines.append(f"{f.name} could not be read: {exc}")
    tests = folder / "tests.txt"
    if tests.exists():
        tail = tests.read_text().strip().splitlines()[-1:]
        results["tests"] = tail[0] if tail else ""
        lines.append(f"tests: {results['tests']}")
    merged.write_text(json.dumps(results, indent=1))
    return lines + summary_lines(results)


def main(argv: list[str]) -> int:
    command, *rest = argv
    if command == "summary":
        print("\n".join(summary(Path(rest[0]), Path(rest[1]))))
        return 0
    if command == "smoke":
        result, path = smoke(rest[0]), rest[1]
    elif command == "timings":
        result, path = timings(), rest[0]
    elif command == "svd":
        result, path = svd(), rest[0]
    else:
        raise SystemExit(f"unknown step {command!r}; expected smoke, timings, svd or summary")
    Path(path).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
