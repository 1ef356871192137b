"""Forward + backward of one adapted layer at VGGT's shapes: frozen nn.Linear (input gradient only),
SubspaceLinear on every backend that runs here, LoRA r=16 (ours) and peft's LoRA r=16.

Run: python -m pytest bench/bench_linear.py --benchmark-json=bench/out/linear.json
then python bench/report.py bench/out/*.json (ratios within one run go to bench/RESULTS.md).
"""

import pytest
import torch
from conftest import DEVICE, DTYPE, TOKENS
from torch import nn

import attrspace
from attrspace import backends

SHAPES = [
    (1024, 3072),
    (1024, 1024),
    (1024, 4096),
    (4096, 1024),
]  # (d_in, d_out): qkv, proj, fc1, fc2
RANKS = [32, 64, 128]
LORA_RANK = 16


def frozen_linear(d_in, d_out):
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out, device=DEVICE, dtype=DTYPE)
    return linear.requires_grad_(False)


def fwd_bwd(module, d_in, d_out):
    x = torch.randn(TOKENS, d_in, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(TOKENS, d_out, device=DEVICE, dtype=DTYPE)

    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(dy)

    return step


def flops(d_in, d_out):
    """The frozen layer's forward + input-gradient matmuls: the floor every adapter is measured against."""
    return 4 * TOKENS * d_in * d_out


def group(d_in, d_out):
    return f"{d_in}->{d_out} T={TOKENS} {str(DTYPE).removeprefix('torch.')} {DEVICE}"


def speed_backends():
    """Backends worth timing here: the Triton interpreter on a CPU is a test tool, not a contender."""
    x = torch.zeros(1, 8, device=DEVICE, dtype=DTYPE)
    w = torch.zeros(8, 8, device=DEVICE, dtype=DTYPE)
    names = [n for n in backends.names() if not backends.reasons(n, x, w, 8)]
    return [n for n in names if not (DEVICE == "cpu" and n == "triton")]


SHAPE_IDS = [f"{a}x{b}" for a, b in SHAPES]


@pytest.mark.parametrize(("d_in", "d_out"), SHAPES, ids=SHAPE_IDS)
def test_frozen(run, benchmark, d_in, d_out):
    benchmark.group = group(d_in, d_out)
    run(fwd_bwd(frozen_linear(d_in, d_out), d_in, d_out), method="frozen", flops=flops(d_in, d_out))


@pytest.mark.parametrize("backend", speed_backends())
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize(("d_in", "d_out"), SHAPES, ids=SHAPE_IDS)
def test_subspace(run, benchmark, d_in, d_out, rank, backend):
    benchmark.group = group(d_in, d_out)
    linear = frozen_linear(d_in, d_out)
    U = torch.linalg.qr(torch.randn(d_out, rank))[0].to(DEVICE, DTYPE)
    V = torch.linalg.qr(torch.randn(d_in, rank))[0].to(DEVICE, DTYPE)
    layer = attrspace.SubspaceLinear.from_linear(linear, U, V, scale=2.0, backend=backend)
    with torch.no_grad():
        layer.M.normal_(std=0.01)
    run(
        fwd_bwd(layer, d_in, d_out),
        method=f"subspace K={rank} [{backend}]",
        flops=flops(d_in, d_out),
    )


@pytest.mark.parametrize(("d_in", "d_out"), SHAPES, ids=SHAPE_IDS)
def test_lora(run, benchmark, d_in, d_out):
    benchmark.group = group(d_in, d_out)
    layer = attrspace.LoRALinear.from_linear(frozen_linear(d_in, d_out), LORA_RANK, 2 * LORA_RANK)
    run(fwd_bwd(layer, d_in, d_out), method=f"LoRA r={LORA_RANK}", flops=flops(d_in, d_out))


@pytest.mark.parametrize(("d_in", "d_out"), SHAPES, ids=SHAPE_IDS)
def test_peft_lora(run, benchmark, d_in, d_out):
    peft = pytest.importorskip("peft", reason="peft is an optional benchmark dependency")
    benchmark.group = group(d_in, d_out)
    holder = nn.Sequential()
    holder.add_module("layer", frozen_linear(d_in, d_out))
    model = peft.get_peft_model(
        holder, peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["layer"])
    )
    run(fwd_bwd(model, d_in, d_out), method=f"peft LoRA r={LORA_RANK}", flops=flops(d_in, d_out))
