"""SubspaceLinear, LoRALinear and LoRAConv2d as modules."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from attrspace import LoRAConv2d, LoRALinear, SubspaceLinear
from attrspace.testing import assert_close, layer_inputs


def make_layer(d_in=32, d_out=24, K=6, scale=2.0, seed=0):
    t = layer_inputs(10, d_in, d_out, K, seed=seed)
    linear = nn.Linear(d_in, d_out)
    with torch.no_grad():
        linear.weight.copy_(t["weight"])
        linear.bias.copy_(t["bias"])
    return linear, SubspaceLinear.from_linear(linear, t["U"], t["V"], scale=scale), t


def test_from_linear_shares_and_freezes_the_base():
    linear, layer, _ = make_layer()
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["M"]
    assert sorted(layer.state_dict()) == ["M", "U", "V", "bias", "weight"]
    x = torch.randn(3, 5, 32)
    assert torch.equal(layer(x), linear(x))  # M = 0 at start: exactly the frozen layer


def test_from_linear_rejects_bad_bases():
    linear = nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"U must have shape \(6, K\)"):
        SubspaceLinear.from_linear(linear, torch.zeros(5, 2), torch.zeros(8, 2))
    with pytest.raises(ValueError, match=r"V must have shape \(8, 2\)"):
        SubspaceLinear.from_linear(linear, torch.zeros(6, 2), torch.zeros(8, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        SubspaceLinear.from_linear(linear, torch.full((6, 2), float("nan")), torch.zeros(8, 2))
    with pytest.raises(TypeError, match=r"plain nn\.Linear"):
        SubspaceLinear.from_linear(nn.Conv2d(8, 6, 1), torch.zeros(6, 2), torch.zeros(8, 2))


def test_delta_weight_merge_unmerge():
    linear, layer, t = make_layer()
    original = linear.weight.detach().clone()
    with torch.no_grad():
        layer.M.copy_(t["M"])
    x = torch.randn(7, 32)
    y = layer(x)
    delta = layer.delta_weight()
    expected = 2.0 * t["U"].double() @ t["M"].double() @ t["V"].double().t()
    assert_close(delta, expected, torch.float32, "delta_weight")
    assert_close(
        y, x.double() @ (original.double() + expected).t() + t["bias"].double(), torch.float32, "y"
    )
    layer.merge()
    assert layer.merged
    assert_close(layer(x), y.double(), torch.float32, "merged y")
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert torch.equal(linear.weight, original)  # bit for bit
    assert torch.equal(layer(x), y)


def test_state_dict_round_trip_and_deepcopy():
    _, layer, t = make_layer()
    with torch.no_grad():
        layer.M.copy_(t["M"])
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    _, fresh, _ = make_layer(seed=5)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 32)
    assert torch.equal(fresh(x), layer(x))
    clone = copy.deepcopy(layer)
    assert clone.weight is not layer.weight
    assert torch.equal(clone(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_layer_trains_m_in_fp32(dtype):
    linear, layer, t = make_layer()
    layer = SubspaceLinear.from_linear(linear.to(dtype), t["U"], t["V"], 2.0)
    assert layer.U.dtype == dtype and layer.M.dtype == torch.float32
    x = torch.randn(6, 32, dtype=dtype, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad.dtype == dtype and layer.M.grad.dtype == torch.float32
    assert torch.isfinite(layer.M.grad).all()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(compiler):
    _, layer, t = make_layer()
    with torch.no_grad():
        layer.M.copy_(t["M"])
    x = torch.randn(2, 9, 32, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    dx, dm = x.grad.clone(), layer.M.grad.clone()
    x.grad = None
    layer.M.grad = None
    compiled = torch.compile(layer, backend=compiler, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(layer.M.grad, dm)


def test_lora_linear_follows_peft_conventions():
    linear = nn.Linear(20, 12)
    lora = LoRALinear.from_linear(linear, rank=4, alpha=8)
    assert lora.weight is linear.weight and not lora.weight.requires_grad
    assert lora.scaling == 2.0
    assert (
        torch.count_nonzero(lora.lora_B.weight) == 0 and torch.count_nonzero(lora.lora_A.weight) > 0
    )
    bound = 1 / math.sqrt(20)  # kaiming_uniform(a=sqrt(5)) on fan_in 20
    assert lora.lora_A.weight.abs().max() <= bound
    x = torch.randn(3, 20)
    assert torch.equal(lora(x), linear(x))
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    expected = (
        x.double() @ (linear.weight.double() + lora.delta_weight().double()).t()
        + linear.bias.double()
    )
    assert_close(lora(x), expected, torch.float32, "LoRA y")
    assert sorted(n for n, p in lora.named_parameters() if p.requires_grad) == [
        "lora_A.weight",
        "lora_B.weight",
    ]


def test_lora_conv2d_matches_its_merged_kernel():
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=2)
    lora = LoRAConv2d.from_conv(conv, rank=3, alpha=6)
    x = torch.randn(2, 6, 9, 9)
    assert torch.equal(lora(x), conv(x))
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    delta = lora.scaling * (lora.lora_B.weight.flatten(1) @ lora.lora_A.weight.flatten(1)).reshape(
        conv.weight.shape
    )
    expected = nn.functional.conv2d(
        x.double(), (conv.weight + delta).double(), conv.bias.double(), stride=2, padding=1
    )
    assert_close(lora(x), expected, torch.float32, "LoRA conv y")
    with pytest.raises(ValueError, match="groups=2"):
        LoRAConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), 2, 2)
