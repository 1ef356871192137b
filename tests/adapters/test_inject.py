"""inject / inject_lora / uninject on a small ViT-like model with a fused qkv Linear."""

import copy

import pytest
import torch
from torch import nn

from attrspace import LoRALinear, SubspaceBank, SubspaceLinear, inject, inject_lora, uninject
from attrspace.bank import LayerSubspace, linear_shapes, random_bank
from attrspace.models.vit import ADAPTED, TinyViT


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyViT(dim=32, depth=2, heads=2, in_dim=12)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_inject_bank_trains_only_m(model):
    bank = random_bank(linear_shapes(model, ADAPTED), 4, scale=2.0, seed=1)
    x = torch.randn(2, 5, 12)
    before = model(x)
    report = inject(model, bank)
    assert sorted(report.layers) == sorted(bank.layers) and len(report.layers) == 8
    assert report.trainable_params == 8 * 4 * 4
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert all(isinstance(model.get_submodule(n), SubspaceLinear) for n in bank.layers)
    assert isinstance(model.blocks[0].attn.qkv, SubspaceLinear) and model.blocks[
        0
    ].attn.qkv.U.shape == (96, 4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.M" for n in bank.layers]
    assert torch.equal(model(x), before)  # M = 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".M")}
    for _ in range(2):
        opt.zero_grad()
        (model(x) - 1).pow(2).mean().backward()
        opt.step()
    assert not torch.equal(model(x), before)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def test_uninject_is_bit_identical_when_untrained(model):
    original = snapshot(model)
    linears = {n: model.get_submodule(n) for n in linear_shapes(model, ADAPTED)}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    inject(model, random_bank(linear_shapes(model, ADAPTED), 3))
    names = uninject(model)
    assert sorted(names) == sorted(linears)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in linears)
    assert all(model.get_submodule(n).weight is linears[n].weight for n in linears)
    state = model.state_dict()
    assert state.keys() == original.keys() and all(
        torch.equal(state[k], v) for k, v in original.items()
    )
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_uninject_merge_folds_the_update(model):
    inject(model, random_bank(linear_shapes(model, ADAPTED), 3, seed=2))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SubspaceLinear):
                m.M.normal_(std=0.1)
    x = torch.randn(2, 5, 12)
    adapted = model(x)
    uninject(model, merge=True)
    assert not any(isinstance(m, SubspaceLinear) for m in model.modules())
    torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)


def test_misfit_bank_is_refused_whole_and_nothing_changes(model):
    shapes = linear_shapes(model, ADAPTED)
    good = random_bank(shapes, 2)
    layers = dict(good.layers)
    layers["blocks.9.attn.qkv"] = layers["blocks.0.attn.qkv"]  # no such module
    layers["blocks.1.mlp.fc1"] = LayerSubspace(
        torch.eye(64)[:, :2], torch.eye(16)[:, :2], torch.zeros(2, dtype=torch.int64)
    )
    layers["norm"] = layers["blocks.0.attn.proj"]  # a LayerNorm
    bad = SubspaceBank(layers, attributes=("random",))
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        inject(model, bad)
    message = str(info.value)
    assert "blocks.9.attn.qkv: no such module" in message
    assert "blocks.1.mlp.fc1: model layer is 32->128, bank has 16->64" in message
    assert "norm: is LayerNorm" in message
    assert not any(isinstance(m, SubspaceLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert snapshot(model).keys() == before.keys()


def test_inject_lora_targets_and_errors(model):
    x = torch.randn(2, 5, 12)
    before = model(x)
    report = inject_lora(model, targets=("attn.qkv", "mlp.fc2"), rank=4, alpha=8)
    assert sorted(report.layers) == [
        "blocks.0.attn.qkv",
        "blocks.0.mlp.fc2",
        "blocks.1.attn.qkv",
        "blocks.1.mlp.fc2",
    ]
    assert report.trainable_params == 2 * (4 * (32 + 96) + 4 * (128 + 32))
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in report.layers)
    assert torch.equal(model(x), before)
    with pytest.raises(ValueError, match=r"'attn\.nothing' matches no"):
        inject_lora(copy.deepcopy(model), targets=("attn.nothing",))
    uninject(model)
    assert torch.equal(model(x), before)


def test_inject_lora_wraps_conv2d():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    report = inject_lora(net, targets=("0", "2"), rank=2, alpha=4)
    assert report.layers == ["0", "2"]
    assert report.trainable_params == 2 * 3 * 9 + 4 * 2 + 2 * 4 + 2 * 2


def test_bank_and_lora_compose(model):
    """A bank on some layers and LoRA on others: both kinds of adapter stay trainable."""
    shapes = linear_shapes(model, ("attn.qkv", "attn.proj"))
    inject(model, random_bank(shapes, 2))
    report = inject_lora(model, targets=("mlp.fc1", "mlp.fc2"), rank=2, alpha=4)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert [n for n in trainable if n.endswith(".M")] == sorted(f"{n}.M" for n in shapes)
    assert len([n for n in trainable if "lora_" in n]) == 8
    assert report.trainable_params == 4 * 2 * 2 + 2 * (2 * (32 + 128) + 2 * (128 + 32))
    uninject(model)
    assert all(p.requires_grad for p in model.parameters())
