"""`attrspace bench`: one layer shape, frozen nn.Linear vs SubspaceLinear vs LoRALinear, forward +
backward per training step (input gradient always; M or the LoRA factors when adapted).

A quick look at one shape on the current machine; the benchmarks of record are in bench/."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attrspace.adapters.nn import LoRALinear, SubspaceLinear
from attrspace.bank import random_bank
from attrspace.measure.profiling import saved_activation_bytes, time_steps


@dataclass
class LayerTiming:
    """One row: median step time, trainable parameters and saved-activation bytes of one step."""

    layer: str
    step_ms: float
    trainable: int
    saved_bytes: int


def bench_layer(
    d_in: int,
    d_out: int,
    tokens: int,
    rank: int,
    lora_rank: int,
    steps: int = 5,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[LayerTiming]:
    """Time a training step of the three layers at one shape. x: (tokens, d_in); K = rank columns
    of a random orthonormal bank; LoRA of rank lora_rank with alpha = 2 * lora_rank."""
    for name, value in (("d_in", d_in), ("d_out", d_out), ("tokens", tokens), ("steps", steps)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 1 <= rank <= min(d_in, d_out):
        raise ValueError(f"rank must be in [1, min(d_in, d_out) = {min(d_in, d_out)}], got {rank}")
    if lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
    generator = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out).to(device=device, dtype=dtype).requires_grad_(False)
    bank = random_bank({"layer": (d_out, d_in)}, rank, scale=2.0, seed=seed, dtype=dtype)
    layer_bank = bank.layers["layer"]
    subspace = SubspaceLinear.from_linear(
        base, layer_bank.U.to(device), layer_bank.V.to(device), 2.0, backend
    )
    lora = LoRALinear.from_linear(base, lora_rank, 2.0 * lora_rank)
    with torch.no_grad():  # nonzero factors so every path does its full work
        subspace.M.normal_()
        lora.lora_B.weight.normal_()
    x = torch.randn(tokens, d_in, generator=generator).to(device=device, dtype=dtype)
    rows = []
    for label, module in (
        ("frozen nn.Linear", base),
        ("SubspaceLinear", subspace),
        ("LoRALinear", lora),
    ):
        x_in = x.clone().requires_grad_(True)

        def step(module=module, x_in=x_in) -> None:
            x_in.grad = None
            module.zero_grad(set_to_none=True)
            module(x_in).square().mean().backward()

        seconds = time_steps(step, steps, warmup=1)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        saved = saved_activation_bytes(module, lambda module=module, x_in=x_in: module(x_in))
        rows.append(LayerTiming(label, 1e3 * seconds, trainable, saved))
    return rows


def format_rows(rows: list[LayerTiming]) -> str:
    """A plain-text table with ratios to the frozen layer."""
    frozen = rows[0].step_ms
    lines = [f"{'layer':<18}{'step ms':>10}{'x frozen':>10}{'trainable':>12}{'saved MiB':>12}"]
    for r in rows:
        lines.append(
            f"{r.layer:<18}{r.step_ms:>10.2f}{r.step_ms / frozen:>10.2f}{r.trainable:>12,}"
            f"{r.saved_bytes / 2**20:>12.2f}"
        )
    return "\n".join(lines)
