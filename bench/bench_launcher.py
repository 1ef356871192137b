"""Host time of the Triton backend's launch wrappers, the kernel launch itself left out.

    python bench/bench_launcher.py [--rounds 9] [--steps 1000]

Runs subspace_linear_forward_factored + subspace_linear_backward_factored (argument checks, output
and scratch allocation, the schedule, descriptors where TMA applies, grid and argument assembly) on
CPU tensors with the @triton.jit kernel replaced by a stub, so what is timed is attrspace's Python
around a launch, not Triton's launcher or the GPU. Interleaved, in one run: the wrappers as they are,
the same wrappers with triton.cdiv / triton.next_power_of_2 in place of the plain-integer helpers of
kernels/_config.py (Triton 3.7's are constexpr functions), and one torch.mm of x V as a yardstick.
Sets TRITON_INTERPRET=1 before importing the kernels (CPU tensors need it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton

from attrspace.kernels import subspace_linear as kernels
from attrspace.testing import layer_inputs

T, D_IN, D_OUT, RANK = 64, 96, 128, 16


class _NoLaunch:
    """Stands in for the @triton.autotune'd kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kernels._fused_kernel = _NoLaunch()
    helpers = {
        "plain": (kernels.cdiv, kernels.next_power_of_2),
        "triton": (triton.cdiv, triton.next_power_of_2),
    }
    t = layer_inputs(T, D_IN, D_OUT, RANK, dtype=torch.float32, seed=0)
    x, w, b, M = t["x"], t["weight"], t["bias"], t["M"].float()
    U, V = t["U"].contiguous(), t["V"].contiguous()
    z, dy = torch.randn(T, RANK), torch.randn(T, D_OUT)

    def wrappers(which: str):
        def step():
            kernels.cdiv, kernels.next_power_of_2 = helpers[which]
            kernels.subspace_linear_forward_factored(x, w, b, U, V, M, 1.5)
            kernels.subspace_linear_backward_factored(dy, w, U, V, M, z, 1.5, True)

        return step

    steps = {
        "wrappers, plain helpers": wrappers("plain"),
        "wrappers, triton's": wrappers("triton"),
        "one torch.mm": lambda: torch.mm(x, V),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(100):
            step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps * 1e6)
    mm = statistics.median(times["one torch.mm"])
    kernels.cdiv, kernels.next_power_of_2 = helpers["plain"]
    print(f"torch {torch.__version__}, triton {triton.__version__}, us per forward + backward")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<26} {med:8.1f} us (best {min(values):.1f})  x{med / mm:5.1f} one mm")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
