"""How low the host time of an exact adapter can go in eager mode: the floor under bench_host.py.

    python bench/host_floor.py [--rounds 15] [--steps 200]

Times, interleaved at bench_host.py's tiny shape (fp32, 4 tokens, 32 -> 48, K = 4), one forward +
backward of: the frozen nn.Linear; the adapter composed from built-in differentiable ops (F.linear,
matmul, addmm: what attrspace's torch backend runs there, without the module, its checks and the
backend choice); and the same exact layer as one C++ autograd node (bench/host_floor.cpp, built here
with torch.utils.cpp_extension: a compiler and ninja are needed, about 30 s the first time). Both
adapters save z = x V and never x. Checks them against each other first. The C++ figure is what the
exact layer costs with no Python at all between its kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

D_IN, D_OUT, RANK, TOKENS, SCALE = 32, 48, 4, 4, 2.0


def composed(x, weight, bias, U, V, M, scale):
    base, h = F.linear(x, weight, bias), F.linear(torch.matmul(x, V), M)
    return torch.addmm(base, h, U.t(), alpha=scale)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny ops: a second thread only adds wake-ups on a shared machine
    native = load("host_floor", [str(Path(__file__).with_suffix(".cpp"))], extra_cflags=["-O2"])
    torch.manual_seed(0)
    layer = torch.nn.Linear(D_IN, D_OUT).requires_grad_(False)
    W, b = layer.weight, layer.bias
    U = torch.linalg.qr(torch.randn(D_OUT, RANK))[0].contiguous()
    V = torch.linalg.qr(torch.randn(D_IN, RANK))[0].contiguous()
    M = torch.randn(RANK, RANK, requires_grad=True)
    x = torch.randn(TOKENS, D_IN, requires_grad=True)
    dy = torch.randn(TOKENS, D_OUT)
    steps = {
        "frozen nn.Linear": lambda: layer(x).backward(dy),
        "composed (Python)": lambda: composed(x, W, b, U, V, M, SCALE).backward(dy),
        "one C++ node": lambda: native.exact_layer(x, W, b, U, V, M, SCALE).backward(dy),
    }
    grads = []
    for name in ("composed (Python)", "one C++ node"):
        x.grad = M.grad = None
        steps[name]()
        grads.append((x.grad.clone(), M.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1])
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(20):
            step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                x.grad = None
                step()
            times[name].append((time.perf_counter() - start) / args.steps * 1e6)
    frozen, best = statistics.median(times["frozen nn.Linear"]), min(times["frozen nn.Linear"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {TOKENS} tokens, "
          f"{D_IN} -> {D_OUT}, K = {RANK}")  # fmt: skip
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<18} {med:8.1f} us  x{med / frozen:5.2f}  best x{min(values) / best:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
