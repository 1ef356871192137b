"""export_peft / export_merged: checked against plain peft and a fresh un-adapted model."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import attrspace
from attrspace import LayerSubspace, SubspaceBank, export_merged, export_peft, inject, inject_lora
from attrspace.export.writers import collect_merged_state, collect_peft_adapter, write_peft_adapter

peft = pytest.importorskip("peft", reason="peft is a test dependency; CI installs it")

D, T = 16, 16  # tokens of a 4 x 4 grid


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(F.scaled_dot_product_attention(q, k, v))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = Attn(), Mlp()

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Net(nn.Module):
    """blocks.{0,1}.attn.{qkv,proj}, blocks.{0,1}.mlp.{fc1,fc2}, a conv head and a plain `out`."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Sequential(nn.Conv2d(D, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 2, 2))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        image = x.transpose(1, 2).reshape(x.shape[0], D, 4, 4)
        return self.out(self.head(image).flatten(2).transpose(1, 2))


def orthonormal(m, k, g):
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0].float()


SUBSPACE = {
    "blocks.0.attn.qkv": 3,
    "blocks.1.attn.qkv": 3,
    "blocks.0.attn.proj": 4,
    "blocks.0.mlp.fc1": 5,
}


def adapted(seed=0):
    """(base, adapted): a fresh copy of the base, and the model with a bank (K = 3, 4, 5, random M)
    on some block linears and LoRA of two different (r, alpha) on others and on the conv head."""
    torch.manual_seed(seed)
    base = Net().eval()
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    layers = {}
    for name, k in SUBSPACE.items():
        lin = base.get_submodule(name)
        layers[name] = LayerSubspace(
            orthonormal(lin.out_features, k, g),
            orthonormal(lin.in_features, k, g),
            torch.zeros(k, dtype=torch.int64),
        )
    inject(model, SubspaceBank(layers, scale=2.0, orthonormal=True))
    inject_lora(model, ["mlp.fc2", "blocks.1.attn.proj", "head.0"], rank=2, alpha=4)
    inject_lora(model, ["blocks.1.mlp.fc1"], rank=3, alpha=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".M") or "lora_B" in name:
                p.normal_(std=0.3, generator=g)
    return base, model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {
        n: p.requires_grad for n, p in model.named_parameters()
    }


def assert_unchanged(model, before):
    state, flags = snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert flags == before[1]


def test_export_peft_is_served_by_plain_peft(tmp_path):
    base, model = adapted()
    x = torch.randn(2, T, D)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
        assert not torch.allclose(expected, base(x), atol=1e-3)  # the adapters do something
    export_peft(model, tmp_path / "adapter", base_model_name_or_path="net")
    assert_unchanged(model, before)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 4)
    assert config["rank_pattern"] == {
        "^blocks\\.0\\.attn\\.qkv": 3,
        "^blocks\\.1\\.attn\\.qkv": 3,
        "^blocks\\.0\\.attn\\.proj": 4,
        "^blocks\\.0\\.mlp\\.fc1": 5,
        "^blocks\\.1\\.mlp\\.fc1": 3,
    }
    assert config["alpha_pattern"]["^blocks\\.0\\.mlp\\.fc1"] == 5  # alpha = K: scaling exactly 1
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    lora_layers = [
        n for n, m in served.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    ]
    assert len(lora_layers) == len(SUBSPACE) + 5
    with torch.no_grad():
        torch.testing.assert_close(served(x), expected, rtol=1e-5, atol=1e-6)
    # attrspace reads it back too, with the scalings peft uses.
    factors = attrspace.load_peft(tmp_path / "adapter")
    assert factors["blocks.0.mlp.fc1"].scale == 1.0 and factors["head.0"].scale == 2.0


def test_get_peft_model_freezes_every_M_export_peft_is_the_way(tmp_path):
    base, model = adapted()
    wrapped = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["out"])
    )
    frozen = [n for n, p in wrapped.named_parameters() if n.endswith(".M")]
    assert len(frozen) == len(SUBSPACE)
    assert not any(p.requires_grad for n, p in wrapped.named_parameters() if n.endswith(".M"))

    export_peft(model, tmp_path)
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    trainable = {n for n, p in served.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * (len(SUBSPACE) + 5) and all("lora_" in n for n in trainable)
    served(torch.randn(2, T, D)).square().mean().backward()
    qkv = served.base_model.model.blocks[0].attn.qkv
    assert qkv.lora_B["default"].weight.grad.abs().sum() > 0  # the subspace layer trains in peft


def test_collect_from_a_plain_state_dict_equals_the_model_path(tmp_path):
    _, model = adapted()
    gathered = {k: v.clone() for k, v in model.state_dict().items()}  # as rank 0 would hold them
    direct, from_dict = collect_peft_adapter(model), collect_peft_adapter(model, gathered)
    assert direct.config == from_dict.config and direct.tensors.keys() == from_dict.tensors.keys()
    assert all(torch.equal(direct.tensors[k], from_dict.tensors[k]) for k in direct.tensors)
    assert all(t.device.type == "cpu" for t in from_dict.tensors.values())
    merged, merged_dict = collect_merged_state(model), collect_merged_state(model, gathered)
    assert all(torch.equal(merged[k], merged_dict[k]) for k in merged)
    write_peft_adapter(from_dict, tmp_path / "a")
    assert set(attrspace.load_peft(tmp_path / "a")) == {
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        for k in direct.tensors
        if k.endswith("lora_A.weight")
    }
    del gathered["blocks.0.attn.qkv.M"]
    with pytest.raises(
        ValueError, match=r"layer blocks.0.attn.qkv: state_dict has no 'blocks.0.attn"
    ):
        collect_peft_adapter(model, gathered)
    gathered["blocks.0.attn.qkv.M"] = torch.empty(3, 3, device="meta")
    with pytest.raises(ValueError, match=r"'blocks.0.attn.qkv.M'\] is on the meta device"):
        collect_peft_adapter(model, gathered)


def test_export_merged_loads_strictly_into_a_fresh_model(tmp_path):
    _, model = adapted()
    x = torch.randn(2, T, D)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    export_merged(model, tmp_path / "merged.safetensors")
    assert_unchanged(model, before)
    tensors = load_file(str(tmp_path / "merged.safetensors"))
    fresh = Net().eval()
    assert tensors.keys() == fresh.state_dict().keys()
    fresh.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
    folded = copy.deepcopy(model)
    attrspace.uninject(folded, merge=True)  # the same rounding as the module's own merge
    assert all(torch.equal(tensors[k], v) for k, v in folded.state_dict().items())


def test_merged_layers_export_the_same(tmp_path):
    _, model = adapted()
    export_merged(model, tmp_path / "a.safetensors")
    export_peft(model, tmp_path / "pa")
    for m in model.modules():
        if isinstance(m, attrspace.SubspaceLinear):
            m.merge()
    export_merged(model, tmp_path / "b.safetensors")
    export_peft(model, tmp_path / "pb")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    pa = load_file(str(tmp_path / "pa" / "adapter_model.safetensors"))
    pb = load_file(str(tmp_path / "pb" / "adapter_model.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_export_of_the_vggt_model_is_the_official_layout(tmp_path):
    from attrspace.models.vggt import VGGT, VGGTConfig, adaptation_targets, load_checkpoint

    torch.manual_seed(0)
    model = VGGT(VGGTConfig.tiny(enable_point=False))
    plain_keys = set(model.state_dict())
    targets = adaptation_targets(model, "paper-lora").lora
    inject_lora(model, targets, rank=2, alpha=4)
    export_merged(model, tmp_path / "model.safetensors")
    assert set(load_file(str(tmp_path / "model.safetensors"))) == plain_keys
    fresh = VGGT(VGGTConfig.tiny(enable_point=False))
    report = load_checkpoint(fresh, tmp_path / "model.safetensors", strict=True)
    assert not report.adapter_keys


def test_refusals_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="holds no attrspace adapters"):
        export_peft(Net(), tmp_path / "a")
    _, model = adapted()
    with torch.no_grad():
        model.blocks[0].attn.proj.M[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer blocks.0.attn.proj: lora_B holds NaN or Inf"):
        export_peft(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"layer blocks.0.attn.proj: merged_weight holds NaN"):
        export_merged(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="is a folder"):
        export_merged(adapted()[1], tmp_path)

    dilated = nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    inject_lora(dilated, ["0"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="layer 0: peft's Conv2d LoRA has no dilation"):
        export_peft(dilated, tmp_path / "d")
    export_merged(dilated, tmp_path / "d.safetensors")  # merging handles it
    assert list(tmp_path.iterdir()) == [tmp_path / "d.safetensors"]
