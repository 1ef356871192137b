"""Ratios that survive a noisy machine: frozen linear, SubspaceLinear, LoRA r=16 and peft's LoRA r=16
timed in turn within every round (interleaved), so slow drift of the machine hits all of them alike.

The per-method rows of bench_linear.py time each method in its own block of rounds; on a shared 2-core
VM the drift between blocks reached 30%, more than the differences being measured. Here one benchmark
round is one forward + backward of every method; the medians per method and their ratios go to
extra_info and from there to bench/RESULTS.md (bench/report.py).
"""

import time

import pytest
import torch
from bench_linear import DEVICE, DTYPE, LORA_RANK, SHAPE_IDS, SHAPES, TOKENS, frozen_linear, fwd_bwd
from conftest import ROUNDS, machine, sync
from torch import nn

import attrspace

RANK = 64


def methods(d_in, d_out):
    linear = frozen_linear(d_in, d_out)
    U = torch.linalg.qr(torch.randn(d_out, RANK))[0].to(DEVICE, DTYPE)
    V = torch.linalg.qr(torch.randn(d_in, RANK))[0].to(DEVICE, DTYPE)
    subspace = attrspace.SubspaceLinear.from_linear(frozen_linear(d_in, d_out), U, V, scale=2.0)
    with torch.no_grad():
        subspace.M.normal_(std=0.01)
    out = {
        "frozen": linear,
        f"subspace K={RANK}": subspace,
        f"LoRA r={LORA_RANK}": attrspace.LoRALinear.from_linear(
            frozen_linear(d_in, d_out), LORA_RANK, 2 * LORA_RANK
        ),
    }
    try:
        import peft
    except ImportError:
        return out
    holder = nn.Sequential()
    holder.add_module("layer", frozen_linear(d_in, d_out))
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["layer"])
    out[f"peft LoRA r={LORA_RANK}"] = peft.get_peft_model(holder, config)
    return out


@pytest.mark.parametrize(("d_in", "d_out"), SHAPES, ids=SHAPE_IDS)
def test_interleaved(benchmark, d_in, d_out):
    steps = {name: fwd_bwd(m, d_in, d_out) for name, m in methods(d_in, d_out).items()}
    times = {name: [] for name in steps}

    def cycle():
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)

    cycle()  # warm-up, discarded
    for t in times.values():
        t.clear()
    benchmark.group = f"interleaved {d_in}->{d_out} T={TOKENS} {DTYPE} {DEVICE}"
    benchmark.pedantic(cycle, rounds=ROUNDS, iterations=1)
    medians = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
    benchmark.extra_info.update(
        {"interleaved": True, "machine": machine(), "median_ms": medians, "rounds": ROUNDS}
    )
