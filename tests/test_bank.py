"""SubspaceBank files: round trips, validation on load, the official release's layout."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from attrspace import BankFileError, LayerSubspace, SubspaceBank
from attrspace.bank import random_bank


def orthonormal(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0].float().contiguous()
    )


def make_bank():
    layers = {
        "aggregator.frame_blocks.0.attn.qkv": LayerSubspace(
            orthonormal(48, 6, 0),
            orthonormal(16, 6, 1),
            torch.tensor([0, 0, 1, 2, 3, 3]),
            torch.linspace(3, 1, 6),
        ),
        "aggregator.global_blocks.1.mlp.fc2": LayerSubspace(
            orthonormal(16, 4, 2), orthonormal(64, 4, 3), torch.tensor([0, 1, 2, 3])
        ),
    }
    return SubspaceBank(
        layers,
        attributes=("texture", "geometry", "camera", "lighting"),
        model_config="vggt-tiny",
        scale=2.0,
        orthonormal=True,
        extra={"seed": 3},
    )


def test_round_trip(tmp_path):
    bank = make_bank()
    bank.save(tmp_path / "bank.safetensors")
    loaded = SubspaceBank.load(tmp_path / "bank.safetensors")
    assert loaded.attributes == bank.attributes and loaded.scale == 2.0 and loaded.orthonormal
    assert loaded.model_config == "vggt-tiny" and loaded.extra == {"seed": 3}
    for name, layer in bank.layers.items():
        other = loaded.layers[name]
        assert torch.equal(other.U, layer.U) and torch.equal(other.V, layer.V)
        assert torch.equal(other.column_attribute, layer.column_attribute)
    assert loaded.layers["aggregator.global_blocks.1.mlp.fc2"].singular_values is None
    assert loaded.ranks("aggregator.frame_blocks.0.attn.qkv") == {
        "texture": 2,
        "geometry": 1,
        "camera": 1,
        "lighting": 2,
    }
    assert loaded.trainable_params() == 36 + 16


def test_truncated_file(tmp_path):
    make_bank().save(tmp_path / "b.safetensors")
    data = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(BankFileError, match=r"t\.safetensors: not a readable safetensors file"):
        SubspaceBank.load(tmp_path / "t.safetensors")


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    make_bank().save(tmp_path / "b.safetensors")
    data = bytearray((tmp_path / "b.safetensors").read_bytes())
    data[-3] ^= 0x10
    (tmp_path / "b.safetensors").write_bytes(bytes(data))
    with pytest.raises(BankFileError, match="does not match the checksum"):
        SubspaceBank.load(tmp_path / "b.safetensors")


def _rewrite(path, mutate):
    """Change tensors/metadata of a saved bank and write it back with a valid checksum."""
    from safetensors import safe_open

    from attrspace._io import checksum

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["attrspace"])
    mutate(tensors, header)
    header["sha256"] = checksum(tensors)
    save_file(tensors, str(path), metadata={"attrspace": json.dumps(header)})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda t, h: t.__setitem__(
                "layers.aggregator.frame_blocks.0.attn.qkv.U", torch.full((48, 6), float("nan"))
            ),
            "layer aggregator.frame_blocks.0.attn.qkv: U holds NaN or Inf",
        ),
        (
            lambda t, h: t.__setitem__(
                "layers.aggregator.frame_blocks.0.attn.qkv.V", torch.randn(16, 6)
            ),
            "layer aggregator.frame_blocks.0.attn.qkv: V is declared orthonormal",
        ),
        (
            lambda t, h: t.__setitem__(
                "layers.aggregator.global_blocks.1.mlp.fc2.U", orthonormal(20, 4, 9)
            ),
            "layer aggregator.global_blocks.1.mlp.fc2: tensors have dims",
        ),
        (
            lambda t, h: t.pop("layers.aggregator.global_blocks.1.mlp.fc2.V"),
            "layer aggregator.global_blocks.1.mlp.fc2: tensor V is missing",
        ),
        (
            lambda t, h: t.__setitem__(
                "layers.aggregator.frame_blocks.0.attn.qkv.column_attribute",
                torch.tensor([0, 0, 1, 2, 3, 7]),
            ),
            "column_attribute indexes outside the 4 attributes",
        ),
        (
            lambda t, h: t.__setitem__(
                "layers.aggregator.frame_blocks.0.attn.qkv.U", torch.zeros(48, 6, dtype=torch.int32)
            ),
            "U must be a float tensor",
        ),
        (
            lambda t, h: t.__setitem__("stray", torch.zeros(1)),
            "tensors not described by the metadata",
        ),
        (lambda t, h: h.__setitem__("schema_version", 99), "schema version 99"),
    ],
    ids=[
        "nan",
        "not-orthonormal",
        "wrong-shape",
        "missing",
        "bad-attribute",
        "int-dtype",
        "stray",
        "version",
    ],
)
def test_bad_contents_name_the_layer_and_fault(tmp_path, mutate, message):
    path = tmp_path / "b.safetensors"
    make_bank().save(path)
    _rewrite(path, mutate)
    with pytest.raises(BankFileError, match=message):
        SubspaceBank.load(path)


def test_not_a_bank(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(BankFileError, match="no 'attrspace' metadata"):
        SubspaceBank.load(tmp_path / "w.safetensors")
    with pytest.raises(BankFileError, match="no such file"):
        SubspaceBank.load(tmp_path / "missing.safetensors")


def test_in_memory_validation():
    with pytest.raises(ValueError, match="must share K"):
        SubspaceBank(
            {
                "a": LayerSubspace(
                    torch.zeros(4, 2), torch.zeros(3, 3), torch.zeros(2, dtype=torch.int64)
                )
            }
        )


def test_official_layout_round_trip(tmp_path):
    bank = make_bank()
    bank.save_official(tmp_path / "official.safetensors")
    raw = load_file(str(tmp_path / "official.safetensors"))
    assert sorted(raw) == [
        "frame_blocks.attn.qkv.0.A",
        "frame_blocks.attn.qkv.0.B",
        "global_blocks.mlp.fc2.1.A",
        "global_blocks.mlp.fc2.1.B",
    ]
    assert raw["frame_blocks.attn.qkv.0.A"].shape == (6, 16)  # V^T
    assert raw["frame_blocks.attn.qkv.0.B"].shape == (48, 6)  # U
    loaded = SubspaceBank.load_official(tmp_path / "official.safetensors")
    assert loaded.scale == 2.0 and set(loaded.layers) == set(bank.layers)
    for name, layer in bank.layers.items():
        assert torch.equal(loaded.layers[name].U, layer.U) and torch.equal(
            loaded.layers[name].V, layer.V
        )


def test_official_layout_errors(tmp_path):
    save_file({"frame_blocks.attn.qkv.0.A": torch.zeros(4, 16)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(BankFileError, match=r"has only \['A'\], needs A and B"):
        SubspaceBank.load_official(tmp_path / "a.safetensors")
    save_file(
        {
            "frame_blocks.attn.qkv.0.A": torch.zeros(4, 16),
            "frame_blocks.attn.qkv.0.B": torch.zeros(48, 5),
        },
        str(tmp_path / "b.safetensors"),
    )
    with pytest.raises(BankFileError, match="do not share K"):
        SubspaceBank.load_official(tmp_path / "b.safetensors")
    save_file({"blocks.0.A": torch.zeros(1)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(BankFileError, match="not in the official layout"):
        SubspaceBank.load_official(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="no key in the official layout"):
        random_bank({"head.fc": (4, 4)}, 2).save_official(tmp_path / "d.safetensors")
