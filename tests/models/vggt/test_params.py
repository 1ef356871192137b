"""The paper's parameter table from the meta-device VGGT-1B, and the presets' target lists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import attrspace
from attrspace.models.vggt import VGGT, VGGTConfig
from attrspace.models.vggt.params import (
    adaptation_targets,
    dpt_head_parameter_count,
    lora_parameter_count,
    official_track_head_parameter_count,
    paper_parameter_table,
    trainable_parameter_count,
)

# Key names and shapes of the official VGGT-1B checkpoint (all 1,797 tensors, no weights).
KEYS_TSV = Path(__file__).parents[2] / "fixtures" / "vggt_1b_state_dict_keys.tsv"


@pytest.fixture(scope="module")
def vggt_1b() -> VGGT:
    with torch.device("meta"):
        return VGGT(VGGTConfig.vggt_1b())


def test_paper_table(vggt_1b):
    assert all(p.is_meta for p in vggt_1b.parameters())
    table = paper_parameter_table(vggt_1b)
    millions = {k: round(v / 1e6, 2) for k, v in table.items()}
    assert millions["total"] == 1256.54
    assert millions["paper-full"] == 853.57
    assert millions["paper-lora r=16"] == 16.34
    assert millions["paper-lora r=64"] == 65.34
    assert millions["paper-lora r=256"] == 261.38
    assert millions["paper-subspace K=16 r=16"] == 3.80
    # Exact counts: the official total (1,797 tensors) and our model without the track head.
    assert table["total"] == 1_256_537_516
    assert table["total_built"] == 1_256_537_516 - 65_941_396


def test_component_counts_agree_with_built_modules_and_key_list(vggt_1b):
    built_depth = sum(p.numel() for p in vggt_1b.depth_head.parameters())
    built_point = sum(p.numel() for p in vggt_1b.point_head.parameters())
    oc = (256, 512, 1024, 1024)
    assert dpt_head_parameter_count(2048, oc, 256, 2) == built_depth == 32_654_562
    assert dpt_head_parameter_count(2048, oc, 256, 4) == built_point
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines()[1:]]
    track = sum(int(n) for key, _, n in rows if key.startswith("track_head."))
    assert official_track_head_parameter_count() == track


def test_preset_targets(vggt_1b):
    lora = adaptation_targets(vggt_1b, "paper-lora")
    assert len(lora.lora) == 192 + 20 + 30  # block Linears, camera-head Linears, depth-head Conv2d
    assert "aggregator.global_blocks.23.mlp.fc2" in lora.lora
    assert "camera_head.poseLN_modulation.1" in lora.lora
    assert "depth_head.resize_layers.3" in lora.lora
    assert "depth_head.resize_layers.0" not in lora.lora  # ConvTranspose2d
    assert not any(n.startswith(("point_head", "aggregator.patch_embed")) for n in lora.lora)
    sub = adaptation_targets(vggt_1b, "paper-subspace")
    assert len(sub.subspace) == 192 and set(sub.subspace) | set(sub.lora) == set(lora.lora)
    assert all(type(vggt_1b.get_submodule(n)) is nn.Linear for n in sub.subspace)
    full = adaptation_targets(vggt_1b, "paper-full")
    assert "aggregator.camera_token" in full.full
    assert not any(n.startswith("aggregator.patch_embed") for n in full.full)
    with pytest.raises(ValueError, match="unknown preset"):
        adaptation_targets(vggt_1b, "paper-everything")
    per_layer = dict.fromkeys(sub.subspace, 8)
    per_layer["aggregator.frame_blocks.0.attn.qkv"] = 32
    counted = trainable_parameter_count(vggt_1b, "paper-subspace", rank=16, subspace_dim=per_layer)
    assert counted == 191 * 64 + 32 * 32 + sum(
        lora_parameter_count(vggt_1b.get_submodule(n), 16) for n in sub.lora
    )


def test_lora_counts():
    assert lora_parameter_count(nn.Linear(10, 30), 4) == 4 * 40
    assert lora_parameter_count(nn.Conv2d(6, 5, 3), 2) == 2 * 6 * 9 + 5 * 2
    with pytest.raises(TypeError):
        lora_parameter_count(nn.ConvTranspose2d(4, 4, 2), 2)


def test_analytic_counts_match_real_injection():
    """The counts agree with what attrspace.inject_lora / inject actually create on a tiny model."""
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.tiny())
    targets = adaptation_targets(model, "paper-lora")
    report = attrspace.inject_lora(model, targets=targets.lora, rank=4, alpha=8)
    assert report.trainable_params == trainable_parameter_count(
        VGGT(VGGTConfig.tiny()), "paper-lora", rank=4
    )
    model = VGGT(VGGTConfig.tiny())
    sub = adaptation_targets(model, "paper-subspace")
    layers = {}
    for name in sub.subspace:
        linear = model.get_submodule(name)
        layers[name] = attrspace.LayerSubspace(
            U=torch.linalg.qr(torch.randn(linear.out_features, 3))[0],
            V=torch.linalg.qr(torch.randn(linear.in_features, 3))[0],
            column_attribute=torch.zeros(3, dtype=torch.int64),
        )
    report = attrspace.inject(model, attrspace.SubspaceBank(layers=layers))
    assert report.trainable_params == len(sub.subspace) * 9
