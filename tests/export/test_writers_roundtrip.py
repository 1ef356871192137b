"""peft round trips that keep what was trained: modules_to_save for other trainable parameters,
refusals naming what a peft folder cannot hold, compiled / DDP / FSDP2-wrapped models, and peft's
TinyLoRA layout, each served (and for TinyLoRA trained on) by plain peft."""

import copy
import json

import pytest
import torch
import torch.distributed as dist
from test_writers import SUBSPACE, D, Net, T, adapted, orthonormal
from torch import nn

import attrspace
from attrspace import LayerSubspace, SubspaceBank, export_peft, inject
from attrspace.export import tinylora
from attrspace.export.peft_folder import load_saved_modules

peft = pytest.importorskip("peft", reason="peft is a test dependency; CI installs it")


def trained(model, steps=3, seed=0):
    """A few SGD steps on every trainable parameter (M, LoRA factors, an unfrozen head)."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(steps):
        x = torch.randn(2, T, D, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def served(base, folder, **kwargs):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder), **kwargs).eval()


def test_an_unfrozen_head_goes_in_as_modules_to_save_and_peft_serves_it(tmp_path):
    base, model = adapted()
    model.head[2].requires_grad_(True)  # a head unfrozen after inject
    trained(model.train()).eval()
    assert not torch.equal(model.head[2].weight, base.head[2].weight)
    export_peft(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head.2"]
    assert set(load_saved_modules(tmp_path / "a")) == {"head.2.weight", "head.2.bias"}
    x = torch.randn(2, T, D)
    with torch.no_grad():
        expected = model(x)
        got = served(base, tmp_path / "a")(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        # without the head the export would be wrong: the head's training is most of the change
        model_old_head = copy.deepcopy(model)
        model_old_head.head[2].load_state_dict(base.head[2].state_dict())
        assert (model_old_head(x) - expected).abs().max() > 1e-2


def test_what_a_peft_folder_cannot_hold_is_refused_by_name(tmp_path):
    _, model = adapted()
    model.blocks[0].attn.qkv.bias.requires_grad_(True)
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.bias \(a tensor of the adapted layer"):
        export_peft(model, tmp_path / "a")
    _, model = adapted()
    model.register_parameter("temperature", nn.Parameter(torch.ones(())))
    model.blocks[0].register_parameter("gate", nn.Parameter(torch.ones(())))
    with pytest.raises(ValueError) as err:
        export_peft(model, tmp_path / "a")
    assert "temperature (a parameter of the model's root" in str(err.value)
    assert "blocks.0.gate (its module blocks.0 holds the adapter blocks.0.attn.qkv" in str(
        err.value
    )
    _, model = adapted()
    model.out.requires_grad_(True)  # peft's modules_to_save ["out"] would also take lora_dropout
    with pytest.raises(ValueError, match=r"'out' would also take '.*\.lora_dropout'"):
        export_peft(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_compiled_and_ddp_wrapped_models_export_what_peft_serves(tmp_path):
    base, model = adapted()
    model.head[2].requires_grad_(True)
    compiled = torch.compile(model, backend="eager")
    trained(compiled.train())
    model.eval()
    x = torch.randn(2, T, D)
    with torch.no_grad():
        expected = model(x)
    export_peft(compiled, tmp_path / "compiled")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        export_peft(nn.parallel.DistributedDataParallel(model), tmp_path / "ddp")
    finally:
        dist.destroy_process_group()
    for name in ("compiled", "ddp"):
        keys = json.loads((tmp_path / name / "adapter_config.json").read_text())["target_modules"]
        assert not any("_orig_mod" in k or k.startswith("module.") for k in keys)
        with torch.no_grad():
            torch.testing.assert_close(
                served(base, tmp_path / name)(x), expected, rtol=1e-5, atol=1e-6
            )


def test_fsdp2_model_is_refused_with_a_pointer_and_save_adapter_gathers_it(tmp_path):
    from torch.distributed.fsdp import fully_shard

    from attrspace.distributed import save_adapter

    base, model = adapted()
    model.head[2].requires_grad_(True)
    trained(model.train()).eval()
    x = torch.randn(2, T, D)
    with torch.no_grad():
        expected = model(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        fully_shard(model)
        with pytest.raises(ValueError, match=r"sharded \(FSDP2.*distributed.save_adapter"):
            export_peft(model, tmp_path / "direct")
        save_adapter(model, tmp_path / "gathered")
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "direct").exists()
    config = json.loads((tmp_path / "gathered" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head.2"]
    with torch.no_grad():
        torch.testing.assert_close(
            served(base, tmp_path / "gathered")(x), expected, rtol=1e-5, atol=1e-6
        )


def uniform_k(K=3, seed=0):
    """(base, model): a bank of one K on the SUBSPACE layers, random M, the head unfrozen."""
    torch.manual_seed(seed)
    base = Net().eval()
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    layers = {}
    for name in SUBSPACE:
        lin = base.get_submodule(name)
        U, V = orthonormal(lin.out_features, K, g), orthonormal(lin.in_features, K, g)
        layers[name] = LayerSubspace(U, V, torch.zeros(K, dtype=torch.int64))
    inject(model, SubspaceBank(layers, scale=2.0, orthonormal=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".M"):
                p.normal_(std=0.3, generator=g)
    model.head[2].requires_grad_(True)
    return base, model


def test_tinylora_layout_is_served_by_peft_and_peft_trains_exactly_m(tmp_path):
    base, model = uniform_k()
    deltas = {n: model.get_submodule(n).delta_weight().detach().clone() for n in SUBSPACE}
    export_peft(model, tmp_path / "tiny", format="tinylora")
    config = json.loads((tmp_path / "tiny" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["u"]) == ("TINYLORA", 3, 9)
    assert config["modules_to_save"] == ["head.2"]
    # attrspace reads its own TinyLoRA folder back as the same updates s U M V^T.
    factors = attrspace.load_peft(tmp_path / "tiny")
    assert set(factors) == set(SUBSPACE)
    for name, f in factors.items():
        torch.testing.assert_close(f.scale * f.B @ f.A, deltas[name], rtol=1e-5, atol=1e-6)
    x = torch.randn(2, T, D)
    theirs = served(base, tmp_path / "tiny", is_trainable=True).train()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
    vs = {n for n in trainable if ".tinylora_v." in n}
    assert len(vs) == len(SUBSPACE)
    assert trainable - vs and all("modules_to_save" in n for n in trainable - vs)  # the head
    # One SGD step in peft and in attrspace on the same loss: v moves exactly as vec(M).
    for net in (theirs, model):
        net.zero_grad()
        net(x).square().mean().backward()
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p -= 0.1 * p.grad
    order = model_order(model)
    for name in SUBSPACE:
        layer = theirs.base_model.model.get_submodule(name)
        key = layer._tinylora_v_key["default"]
        assert key == str(order.index(name))  # v's index: the layers' module order
        v = layer.tinylora_v["default"][key]
        M = model.get_submodule(name).M
        assert not torch.allclose(M, M.new_zeros(M.shape))
        torch.testing.assert_close(v.reshape(3, 3), M, rtol=1e-5, atol=1e-6)


def model_order(model):
    return [n for n, m in model.named_modules() if isinstance(m, attrspace.SubspaceLinear)]


def test_tinylora_refusals_state_the_reason(tmp_path):
    _, model = adapted()  # K 3, 4 and 5, and LoRA layers
    with pytest.raises(ValueError, match=r"holds SubspaceLinear layers only; 5 LoRA layers"):
        export_peft(model, tmp_path / "a", format="tinylora")
    layers = {
        n: (torch.eye(6, k), torch.eye(6, k), torch.zeros(k, k), 2.0)
        for n, k in (("a", 3), ("b", 4))
    }
    with pytest.raises(ValueError, match=r"one r per adapter, the layers have K \[3, 4\]"):
        tinylora.tinylora_tensors(layers)
    with pytest.raises(ValueError, match=r"K = 33 > 32: .*K\^4 = 1,185,921 numbers per layer"):
        tinylora.check_ranks({"a": 33})
    with pytest.raises(ValueError, match=r"format must be 'lora' or 'tinylora'"):
        export_peft(model, tmp_path / "a", format="loha")
    assert not (tmp_path / "a").exists()


def test_unit_projections_make_r_equal_m():
    K = 4
    M = torch.randn(K, K)
    R = torch.einsum("i,ijk->jk", M.reshape(-1), tinylora.unit_projections(K))
    assert torch.equal(R, M)
