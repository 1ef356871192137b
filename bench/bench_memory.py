"""Memory: activation bytes autograd keeps per adapted layer, and for a training step of a ViT-like stack;
on a GPU also the peak allocated memory of that step. SubspaceLinear against LoRA and the frozen model.
"""

import copy

import pytest
import torch
from conftest import DEVICE, DTYPE, TOKENS, machine, sync
from torch import nn

import attrspace
from attrspace.bank import linear_shapes, random_bank
from attrspace.measure.profiling import saved_activation_bytes
from attrspace.models.vit import ADAPTED, TinyViT

D_IN, D_OUT, RANK, LORA_RANK = 1024, 3072, 64, 16


def layer(method):
    torch.manual_seed(0)
    linear = nn.Linear(D_IN, D_OUT, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    if method == "frozen":
        return linear
    if method == "subspace":
        U = torch.linalg.qr(torch.randn(D_OUT, RANK))[0].to(DEVICE, DTYPE)
        V = torch.linalg.qr(torch.randn(D_IN, RANK))[0].to(DEVICE, DTYPE)
        return attrspace.SubspaceLinear.from_linear(linear, U, V, scale=2.0)
    return attrspace.LoRALinear.from_linear(linear, LORA_RANK, 2 * LORA_RANK)


@pytest.mark.parametrize("method", ["frozen", "subspace", "lora"])
def test_saved_bytes_per_layer(benchmark, method):
    benchmark.group = f"memory: one {D_IN}->{D_OUT} layer, T={TOKENS}, {DTYPE}"
    module = layer(method)
    x = torch.randn(TOKENS, D_IN, device=DEVICE, dtype=DTYPE, requires_grad=True)
    saved = saved_activation_bytes(module, lambda: module(x))
    benchmark.extra_info.update(
        {"method": method, "saved_bytes": saved, "memory": True, "machine": machine()}
    )
    benchmark.pedantic(lambda: module(x), rounds=3, iterations=1)


def stack(method):
    torch.manual_seed(0)
    model = TinyViT(dim=512, depth=4, heads=8, in_dim=64).to(DEVICE, DTYPE)
    if method == "subspace":
        attrspace.inject(
            model, random_bank(linear_shapes(model, ADAPTED), RANK, scale=2.0, dtype=DTYPE)
        )
    elif method == "lora":
        attrspace.inject_lora(model, ADAPTED, rank=LORA_RANK, alpha=2 * LORA_RANK)
    else:
        model.requires_grad_(False)
    return model


@pytest.mark.parametrize("method", ["frozen", "subspace", "lora"])
def test_training_step_of_a_stack(benchmark, method):
    """A ViT-like stack (dim 512, 4 blocks, 2 x 1024 tokens): saved activations of the whole step."""
    benchmark.group = f"memory: TinyViT dim=512 depth=4, 2x1024 tokens, {DTYPE}"
    model = stack(method)
    x = torch.randn(2, 1024, 64, device=DEVICE, dtype=DTYPE, requires_grad=(method == "frozen"))
    saved = saved_activation_bytes(model, lambda: model(x).float().pow(2).mean())
    info = {"method": method, "saved_bytes": saved, "memory": True, "machine": machine()}
    if DEVICE == "cuda":
        copy.deepcopy(model)(x).float().pow(2).mean().backward()  # warm the allocator
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(x).float().pow(2).mean().backward()
        sync()
        info["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    benchmark.extra_info.update(info)

    def step():
        model(x).float().pow(2).mean().backward()

    benchmark.pedantic(step, rounds=1, iterations=1)
