"""Adapters through the life of a training job: casts, state dicts, merging, compile with
checkpointing, and refusals that leave the model untouched."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from attrspace import LoRALinear, SubspaceLinear, inject, inject_lora, uninject
from attrspace.bank import linear_shapes, random_bank
from attrspace.models.vit import ADAPTED, TinyViT


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyViT(dim=32, depth=2, heads=2, in_dim=12)


def trained_bank_model(seed=0):
    torch.manual_seed(seed)
    model = TinyViT(dim=32, depth=2, heads=2, in_dim=12)
    inject(model, random_bank(linear_shapes(model, ADAPTED), 4, scale=2.0, seed=seed))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SubspaceLinear):
                m.M.normal_(std=0.1)
    return model


def state_of(model):
    """Everything a refused call must leave alone: module types, parameters, flags."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        {n: b.clone() for n, b in model.named_buffers()},
    )


def assert_same_state(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        assert torch.equal(a[1][n][0], b[1][n][0]) and a[1][n][1] == b[1][n][1], n
    assert a[2].keys() == b[2].keys()


# ---- bases and M ----------------------------------------------------------------------------


def test_bases_are_frozen_parameters_not_buffers():
    model = trained_bank_model()
    layer = model.blocks[0].attn.qkv
    params = dict(layer.named_parameters())
    assert {"U", "V", "M"} <= params.keys()
    assert not params["U"].requires_grad and not params["V"].requires_grad
    assert params["M"].requires_grad
    # DDP syncs every buffer before each forward: an adapted model must not add any.
    assert not any(isinstance(m, SubspaceLinear) and list(m.buffers()) for m in model.modules())


@pytest.mark.parametrize("cast", ["to_bf16", "half", "to_fp16_and_back"])
def test_module_casts_never_narrow_m(cast):
    model = trained_bank_model()
    model.blocks[0].attn.qkv.M.grad = torch.ones(4, 4)
    before = {n: m.M.detach().clone() for n, m in model.named_modules() if hasattr(m, "U")}
    if cast == "to_bf16":
        model.to(torch.bfloat16)
    elif cast == "half":
        model.half()
    else:
        model.to(torch.float16).float()
    for n, m in model.named_modules():
        if isinstance(m, SubspaceLinear):
            assert m.M.dtype == torch.float32, n
            assert torch.equal(m.M.detach(), before[n]), f"{n}: M's values changed"
            expected = torch.float32 if cast == "to_fp16_and_back" else torch.float16
            if cast == "to_bf16":
                expected = torch.bfloat16
            assert m.weight.dtype == m.U.dtype == m.V.dtype == expected
    assert model.blocks[0].attn.qkv.M.grad.dtype == torch.float32


def test_double_widens_m_and_float_brings_it_back():
    model = trained_bank_model()
    model.double()
    layer = model.blocks[0].attn.qkv
    assert layer.M.dtype == torch.float64 and layer.weight.dtype == torch.float64
    model.float()
    assert layer.M.dtype == torch.float32


def test_bf16_model_trains_m_in_float32():
    model = trained_bank_model().to(torch.bfloat16)
    x = torch.randn(2, 5, 12, dtype=torch.bfloat16)
    model(x).float().pow(2).mean().backward()
    layer = model.blocks[0].attn.qkv
    assert layer.M.grad is not None and layer.M.grad.dtype == torch.float32


def test_layer_builds_on_meta():
    with torch.device("meta"):
        linear = nn.Linear(16, 24)
        layer = SubspaceLinear.from_linear(linear, torch.empty(24, 4), torch.empty(16, 4), 2.0)
    assert layer.M.device.type == "meta" and layer.U.shape == (24, 4)


# ---- state dicts ----------------------------------------------------------------------------


def test_state_dict_of_merged_layers_is_never_applied_twice():
    model = trained_bank_model()
    x = torch.randn(2, 5, 12)
    expected = model(x)
    for m in model.modules():
        if isinstance(m, SubspaceLinear):
            m.merge()
    state = copy.deepcopy(model.state_dict())
    fresh = trained_bank_model(seed=1)  # same structure, other values, unmerged
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_loading_into_a_merged_layer_is_refused():
    model = trained_bank_model()
    state = copy.deepcopy(model.state_dict())
    model.blocks[0].attn.qkv.merge()
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\.qkv.*unmerge"):
        model.load_state_dict(state)


@pytest.mark.parametrize("kind", ["bank", "lora"])
def test_plain_checkpoint_loads_strictly_into_an_adapted_model(kind):
    torch.manual_seed(3)
    plain = TinyViT(dim=32, depth=2, heads=2, in_dim=12)
    checkpoint_state = copy.deepcopy(plain.state_dict())
    model = trained_bank_model() if kind == "bank" else TinyViT(dim=32, depth=2, heads=2, in_dim=12)
    if kind == "lora":
        inject_lora(model, rank=2, alpha=4)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.weight.normal_()
    adapter_before = {
        k: v.clone() for k, v in model.state_dict().items() if k not in plain.state_dict()
    }
    model.load_state_dict(checkpoint_state, strict=True)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in checkpoint_state.items())
    assert all(torch.equal(after[k], v) for k, v in adapter_before.items())


def test_a_state_dict_missing_some_adapter_keys_is_still_an_error():
    model = trained_bank_model()
    state = model.state_dict()
    del state["blocks.0.attn.qkv.M"]
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\.qkv\.M"):
        model.load_state_dict(state, strict=True)


def test_deepcopy_keeps_hooks_on_the_copy():
    model = trained_bank_model()
    twin = copy.deepcopy(model)
    twin.blocks[0].attn.qkv.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        twin.load_state_dict(model.state_dict())
    model.load_state_dict(model.state_dict())  # the original is not merged


# ---- compile with checkpointing ----------------------------------------------------------------


def test_compile_with_checkpointing_is_one_graph():
    model = trained_bank_model()
    block = model.blocks[0]

    def run(x):
        return checkpoint(block, x, use_reentrant=False)

    x = torch.randn(2, 5, 32, requires_grad=True)
    explanation = torch._dynamo.explain(run)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ---- refusals leave the model untouched ------------------------------------------------------


def test_bogus_backend_changes_nothing(model):
    before = state_of(model)
    with pytest.raises(ValueError, match="bogus"):
        inject(model, random_bank(linear_shapes(model, ADAPTED), 4), backend="bogus")
    assert_same_state(state_of(model), before)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"rank": 0}, ValueError),
        ({"rank": -2}, ValueError),
        ({"rank": 2.5}, TypeError),
        ({"dropout": 1.5}, ValueError),
        ({"alpha": math.nan}, ValueError),
        ({"alpha": math.inf}, ValueError),
        ({"alpha": 0.0}, ValueError),
        ({"alpha": -1.0}, ValueError),
    ],
)
def test_bad_lora_arguments_change_nothing(model, kwargs, error):
    before = state_of(model)
    with pytest.raises(error, match=next(iter(kwargs))):
        inject_lora(model, **kwargs)
    assert_same_state(state_of(model), before)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 0.0, -2.0])
def test_bad_scales_are_refused_everywhere(model, scale):
    before = state_of(model)
    bank = random_bank(linear_shapes(model, ADAPTED), 4)
    with pytest.raises(ValueError, match="scale"):
        inject(model, bank, scale=scale)
    assert_same_state(state_of(model), before)
    linear = nn.Linear(8, 6)
    with pytest.raises(ValueError, match="scale"):
        SubspaceLinear.from_linear(linear, torch.randn(6, 2), torch.randn(8, 2), scale)
    assert linear.weight.requires_grad


def test_bank_altered_after_loading_swaps_nothing(model):
    bank = random_bank(linear_shapes(model, ADAPTED), 4)
    last = list(bank.layers.values())[-1]
    object.__setattr__(last, "U", torch.full_like(last.U, math.nan))
    before = state_of(model)
    with pytest.raises(ValueError, match="NaN"):
        inject(model, bank)
    assert_same_state(state_of(model), before)


def test_uninject_with_a_merged_layer_swaps_nothing():
    model = trained_bank_model()
    model.blocks[1].mlp.fc2.merge()
    before = state_of(model)
    with pytest.raises(RuntimeError, match=r"blocks\.1\.mlp\.fc2"):
        uninject(model)
    assert_same_state(state_of(model), before)


def test_vggt_aggregator_with_a_bank_and_checkpointing_compiles_to_one_graph():
    from attrspace.models.vggt import VGGT, VGGTConfig, adaptation_targets

    torch.manual_seed(0)
    vggt = VGGT(VGGTConfig.tiny(gradient_checkpointing=True, enable_point=False))
    names = adaptation_targets(vggt, "paper-subspace").subspace
    inject(vggt, random_bank(linear_shapes(vggt, names), 4))
    vggt.train()
    explanation = torch._dynamo.explain(vggt.aggregator)(torch.rand(1, 2, 3, 56, 56))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
