"""Forward + backward of one adapted layer at VGGT's shapes: frozen nn.Linear (input gradient only),
SubspaceLinear on every backend that runs here, LoRA r=16 (ours) and peft's LoRA r=16.

Run: python -m pytest bench/bench_linear.py --benchmark-json=bench/out/linear.json
then python bench/report.py bench/out/*.json (ratios within one run go to bench/RESULTS.md).
"""

import pytest
import torch
from conftest import DEVICE, DTYPE, TOKENS

from attrspace import backends
from attrspace.measure.lineup import build_layer, training_step

SHAPES = [
    (1024, 3072),
    (1024, 1024),
    (1024, 4096),
    (4096, 1024),
]  # (d_in, d_out): qkv, proj, fc1, fc2
RANKS = [32, 64, 128]
LORA_RANK = 16


def fwd_bwd(kind, d_in, d_out, **options):
    """One training step of the line-up's layer `kind` (attrspace.measure.lineup) at this shape."""
    layer = build_layer(
        kind, d_in, d_out, lora_rank=LORA_RANK, device=DEVICE, dtype=DTYPE, **options
    )
    x = torch.randn(TOKENS, d_in, device=DEVICE, dtype=DTYPE)
    dy = torch.randn(TOKENS, d_out, device=DEVICE, dtype=DTYPE)
    return training_step(layer, x, dy)


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
    run(fwd_bwd("frozen", d_in, d_out), method="frozen", flops=flops(d_in, d_out))


@pytest.mark.parametrize("backend", speed_backends())
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize(("d_in", "d_out"), SHAPES, ids=SHAPE_IDS)
def test_subspace(run, benchmark, d_in, d_out, rank, backend):
    benchmark.group = group(d_in, d_out)
    run(
        fwd_bwd("subspace", d_in, d_out, rank=rank, backend=backend),
        method=f"subspace K={rank} [{backend}]",
        flops=flops(d_in, d_out),
    )


@pytest.mark.parametrize(("d_in", "d_out"), SHAPES, ids=SHAPE_IDS)
def test_lora(run, benchmark, d_in, d_out):
    benchmark.group = group(d_in, d_out)
    run(fwd_bwd("lora", d_in, d_out), method=f"LoRA r={LORA_RANK}", flops=flops(d_in, d_out))


@pytest.mark.parametrize(("d_in", "d_out"), SHAPES, ids=SHAPE_IDS)
def test_peft_lora(run, benchmark, d_in, d_out):
    pytest.importorskip("peft", reason="peft is an optional benchmark dependency")
    benchmark.group = group(d_in, d_out)
    run(fwd_bwd("peft", d_in, d_out), method=f"peft LoRA r={LORA_RANK}", flops=flops(d_in, d_out))
