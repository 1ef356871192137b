"""LoRAConv2d against the convolution it wraps: a zero-B adapter must reproduce the original module
bit for bit AND with the same strides (a changed layout can make the next convolution take another
kernel with other rounding), and a trained one must equal the torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attrspace import LoRAConv2d

# (in, out, kernel, stride, padding, dilation, padding_mode, input H x W)
GEOMETRIES = [
    (8, 8, 3, 2, 1, 1, "zeros", (2, 2)),  # VGGT's resize_layers.3 on a 2 x 2 grid: a 1 x 1 output
    (8, 6, 3, 2, 1, 1, "zeros", (7, 5)),
    (5, 7, 1, 1, 0, 1, "zeros", (4, 3)),
    (6, 4, 3, 1, 1, 1, "zeros", (1, 1)),
    (4, 5, (3, 2), (2, 3), (1, 0), (2, 1), "zeros", (9, 8)),
    (4, 4, 3, 1, 1, 1, "reflect", (5, 6)),
]


def _inputs(c: int, hw: tuple[int, int], g: torch.Generator) -> dict[str, torch.Tensor]:
    x = torch.randn(3, c, *hw, generator=g)
    wide = torch.randn(3, c, hw[0], 2 * hw[1], generator=g)
    # What the DPT head feeds its convolutions: (B, C, N) tokens transposed into a grid.
    tokens = torch.randn(3, hw[0] * hw[1], c, generator=g).transpose(1, 2).reshape(3, c, *hw)
    return {
        "contiguous": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided_view": wide[..., ::2],
        "transposed_tokens": tokens,
    }


def _conv(geometry, g: torch.Generator) -> nn.Conv2d:
    cin, cout, k, stride, pad, dil, mode, _ = geometry
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, padding_mode=mode)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    return conv


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda geo: f"{geo[:4]}{geo[6]}{geo[7]}")
def test_zero_b_adapter_is_the_original_module_values_and_strides(geometry):
    g = torch.Generator().manual_seed(0)
    conv = _conv(geometry, g)
    follow = nn.Conv2d(geometry[1], 3, 3, padding=1)  # a next layer that sees the output's layout
    inputs = _inputs(geometry[0], geometry[7], g)
    with torch.no_grad():
        want = {name: conv(x) for name, x in inputs.items()}
        after = {name: follow(y) for name, y in want.items()}
        lora = LoRAConv2d(conv, rank=2, alpha=4.0)
        for name, x in inputs.items():
            got = lora(x)
            assert torch.equal(got, want[name]), name
            assert got.stride() == want[name].stride(), name
            assert torch.equal(follow(got), after[name]), name


def test_output_strides_survive_a_trained_adapter():
    """The layout must not depend on B's values either (the 1 x 1 channels_last case)."""
    g = torch.Generator().manual_seed(1)
    conv = _conv(GEOMETRIES[0], g)
    lora = LoRAConv2d(conv, rank=2, alpha=4.0)
    with torch.no_grad():
        lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=g))
    x = _inputs(8, (2, 2), g)["transposed_tokens"]
    assert lora(x).stride() == conv(x).stride() == (8, 1, 8, 8)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed_tokens"])
def test_trained_adapter_matches_reference_forward_and_gradients(layout):
    g = torch.Generator().manual_seed(2)
    geometry = GEOMETRIES[1]
    conv = _conv(geometry, g)
    lora = LoRAConv2d(conv, rank=3, alpha=6.0)
    with torch.no_grad():
        lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=g))
    x = _inputs(geometry[0], geometry[7], g)[layout].requires_grad_(True)
    grad_out = torch.randn(lora(x).shape, generator=g)

    out = lora(x)
    out.backward(grad_out)
    got = (out.detach(), x.grad, lora.lora_A.weight.grad, lora.lora_B.weight.grad)

    # Reference in float64, out of place: conv + (alpha / r) * B(A(x)).
    x64 = x.detach().double().requires_grad_(True)
    a64 = lora.lora_A.weight.detach().double().requires_grad_(True)
    b64 = lora.lora_B.weight.detach().double().requires_grad_(True)
    geo = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
    ref = F.conv2d(x64, conv.weight.double(), conv.bias.double(), **geo)
    ref = ref + 2.0 * F.conv2d(F.conv2d(x64, a64, **geo), b64)
    ref.backward(grad_out.double())
    for name, value, want in zip(
        ("output", "x.grad", "A.grad", "B.grad"),
        got,
        (ref, x64.grad, a64.grad, b64.grad),
        strict=True,
    ):
        torch.testing.assert_close(value, want.float(), rtol=1e-5, atol=1e-5, msg=name)
    assert conv.weight.grad is None and conv.bias.grad is None
    # The merged kernel computes the same map.
    merged = F.conv2d(x.detach(), conv.weight + lora.delta_weight(), conv.bias, **geo)
    torch.testing.assert_close(merged, out.detach(), rtol=1e-5, atol=1e-5)
