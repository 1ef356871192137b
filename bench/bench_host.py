"""Host overhead of one forward + backward, at a shape so small that the arithmetic is negligible.

    python bench/bench_host.py [--rounds 15] [--steps 200] [--json OUT.json]

Each round times `steps` back-to-back fwd+bwd of every method in turn (interleaved, so drifting load
hits all alike) and the table gives, per method, the median over rounds of microseconds per step, the
spread (min-max) of the rounds, the ratio of medians to the frozen nn.Linear and the ratio of best
rounds (the least disturbed on a shared machine). Methods: frozen
nn.Linear (dx only), SubspaceLinear (backend "auto": torch on a CPU), attrspace's LoRALinear and peft's
LoRA, all r = K = 4 on 32 -> 48, 4 tokens, fp32, eager. On a GPU the same step is mostly launch and
framework time, so this is the part of a training step the kernels cannot win back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from peft_import import import_peft
from torch import nn

import attrspace

D_IN, D_OUT, RANK, TOKENS = 32, 48, 4, 4


def methods(device: str = "cpu") -> dict[str, nn.Module]:
    """name -> module, each on its own copy of one frozen nn.Linear."""

    def frozen() -> nn.Linear:
        torch.manual_seed(0)
        return nn.Linear(D_IN, D_OUT, device=device).requires_grad_(False)

    U = torch.linalg.qr(torch.randn(D_OUT, RANK))[0].to(device)
    V = torch.linalg.qr(torch.randn(D_IN, RANK))[0].to(device)
    out = {
        "frozen nn.Linear": frozen(),
        "SubspaceLinear": attrspace.SubspaceLinear.from_linear(frozen(), U, V, scale=2.0),
        "attrspace LoRA": attrspace.LoRALinear.from_linear(frozen(), RANK, 2 * RANK),
    }
    try:
        peft = import_peft()
    except ImportError as exc:
        print(f"peft's LoRA is left out: {exc}", file=sys.stderr)
        return out
    holder = nn.Sequential()
    holder.add_module("layer", frozen())
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["layer"])
    out["peft LoRA"] = peft.get_peft_model(holder, config)
    return out


def measure(rounds: int, steps: int, device: str = "cpu") -> dict[str, list[float]]:
    """Microseconds per fwd+bwd of every method, one entry per round."""
    x = torch.randn(TOKENS, D_IN, device=device, requires_grad=True)
    dy = torch.randn(TOKENS, D_OUT, device=device)
    mods = methods(device)
    for module in mods.values():  # warm-up: first-call imports, autograd graph caches
        for _ in range(20):
            module(x).backward(dy)
    times: dict[str, list[float]] = {name: [] for name in mods}
    for _ in range(rounds):
        for name, module in mods.items():
            start = time.perf_counter()
            for _ in range(steps):
                x.grad = None
                module(x).backward(dy)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / steps * 1e6)
    return times


def table(times: dict[str, list[float]]) -> list[str]:
    frozen = statistics.median(times["frozen nn.Linear"])
    best = min(times["frozen nn.Linear"])
    lines = [
        f"{'method':<18} {'us / fwd+bwd':>12} {'spread':>15} {'x frozen':>9} {'best x frozen':>14}"
    ]
    for name, values in times.items():
        med = statistics.median(values)
        spread = f"{min(values):.1f}-{max(values):.1f}"
        # the best round of each: the least disturbed by other processes
        lines.append(
            f"{name:<18} {med:12.1f} {spread:>15} {med / frozen:9.2f} {min(values) / best:14.2f}"
        )
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)  # tiny ops: a second thread only adds wake-ups on a shared machine
    times = measure(args.rounds, args.steps, device)
    print(f"{device}, torch {torch.__version__}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, {TOKENS} tokens, {D_IN} -> {D_OUT}, r = K = {RANK}")  # fmt: skip
    print("\n".join(table(times)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "times_us": times}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
