"""SubspaceBank files: round trips, validation on load, the official release's layout."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from attrspace import BankFileError, LayerSubspace, SubspaceBank
from attrspace.bank import random_bank, upgrade_v1_file
from attrspace.bank.subspace_bank import _digest
from attrspace.util.files import checksum


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
    with pytest.raises(BankFileError, match="do not match the checksum"):
        SubspaceBank.load(tmp_path / "b.safetensors")


def _rewrite(path, mutate):
    """Change tensors/metadata of a saved bank and write it back with a valid checksum, so only
    the validation on load can catch the change."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["attrspace"])
    mutate(tensors, header)
    text = json.dumps(header)
    save_file(
        tensors, str(path), metadata={"attrspace": text, "attrspace_sha256": _digest(tensors, text)}
    )


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


# -- the header is inside the checksum and validated ----------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'scale\\": 2.0', b'scale\\": 3.0'),  # a number
        (b'scale\\"', b'rcale\\"'),  # a key name (would read as the default scale)
        (b'orthonormal\\": true', b'orthonormal\\": null'),  # a flag
        (b'texture\\"', b'texturf\\"'),  # an attribute name
        (b'seed\\": 3', b'seed\\": 4'),  # provenance in extra
        (b"vggt-tiny", b"vggt-tinz"),  # model_config
    ],
    ids=["scale", "key-name", "orthonormal", "attribute", "extra", "model-config"],
)
def test_flipped_metadata_is_caught_by_the_checksum(tmp_path, old, new):
    path = tmp_path / "b.safetensors"
    make_bank().save(path)
    data = path.read_bytes()
    assert data.count(old) == 1, old
    path.write_bytes(data.replace(old, new))
    with pytest.raises(BankFileError, match="do not match the checksum"):
        SubspaceBank.load(path)


def _set(key, value):
    return lambda t, h: h.__setitem__(key, value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("attributes", "abcd"), "attributes must be a list of str"),
        (_set("attributes", ["a", "b", 3, "d"]), "attributes must be non-empty str, got 3"),
        (_set("attributes", ["a", "a", "b", "c"]), "attributes must be distinct"),
        (lambda t, h: h.pop("scale"), r"missing key\(s\) \['scale'\]"),
        (_set("rcale", 1.0), r"unknown key\(s\) \['rcale'\]"),
        (_set("scale", 0.0), "scale must be finite and > 0, got 0.0"),
        (_set("scale", -2.0), "scale must be finite and > 0"),
        (_set("scale", 1e999), "Infinity is not a JSON number"),
        (_set("scale", "2.0"), "scale must be a real number"),
        (_set("scale", True), "scale must be a real number"),
        (_set("orthonormal", 1), "orthonormal must be true or false"),
        (_set("model_config", 7), "model_config must be a str"),
        (_set("extra", [1]), "extra must be a dict"),
        (
            lambda t, h: h["layers"]["aggregator.global_blocks.1.mlp.fc2"].__setitem__("K", 0),
            r"K \(layer aggregator.global_blocks.1.mlp.fc2\) must be >= 1",
        ),
        (
            lambda t, h: h["layers"]["aggregator.global_blocks.1.mlp.fc2"].pop("d_in"),
            "layer aggregator.global_blocks.1.mlp.fc2: needs exactly",
        ),
        (_set("layers", {}), "layers must be a non-empty object"),
    ],
    ids=[
        "attributes-str",
        "attribute-int",
        "attributes-duplicate",
        "missing-scale",
        "unknown-key",
        "scale-zero",
        "scale-negative",
        "scale-inf",
        "scale-str",
        "scale-bool",
        "orthonormal-int",
        "model-config-int",
        "extra-list",
        "K-zero",
        "layer-key-missing",
        "no-layers",
    ],
)
def test_bad_metadata_is_refused_by_name(tmp_path, mutate, message):
    path = tmp_path / "b.safetensors"
    make_bank().save(path)
    _rewrite(path, mutate)
    with pytest.raises(BankFileError, match=message):
        SubspaceBank.load(path)


def test_nan_scale_written_as_json_constant_is_refused(tmp_path):
    path = tmp_path / "b.safetensors"
    make_bank().save(path)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        text = f.metadata()["attrspace"].replace('"scale": 2.0', '"scale": NaN')
    save_file(
        tensors, str(path), metadata={"attrspace": text, "attrspace_sha256": _digest(tensors, text)}
    )
    with pytest.raises(BankFileError, match="NaN is not a JSON number"):
        SubspaceBank.load(path)


def test_missing_checksum_and_stray_metadata(tmp_path):
    path = tmp_path / "b.safetensors"
    make_bank().save(path)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata={"attrspace": metadata["attrspace"]})
    with pytest.raises(BankFileError, match="no 'attrspace_sha256' metadata"):
        SubspaceBank.load(path)
    save_file(tensors, str(path), metadata={**metadata, "note": "x"})
    with pytest.raises(BankFileError, match=r"unknown metadata keys \['note'\]"):
        SubspaceBank.load(path)


def _write_v1(bank, path):
    """A file as schema 1 wrote it: the sha256 inside the header covers the tensors only."""
    tensors = {}
    for name, layer in bank.layers.items():
        tensors[f"layers.{name}.U"] = layer.U
        tensors[f"layers.{name}.V"] = layer.V
        tensors[f"layers.{name}.column_attribute"] = layer.column_attribute
        if layer.singular_values is not None:
            tensors[f"layers.{name}.singular_values"] = layer.singular_values
    header = bank._header() | {"schema_version": 1, "sha256": checksum(tensors)}
    save_file(tensors, str(path), metadata={"attrspace": json.dumps(header)})
    return header


def test_schema_1_is_refused_with_the_way_to_rewrite_it(tmp_path, capsys):
    bank = make_bank()
    _write_v1(bank, tmp_path / "v1.safetensors")
    with pytest.raises(BankFileError, match=r"schema version 1 .*upgrade_v1_file"):
        SubspaceBank.load(tmp_path / "v1.safetensors")
    upgrade_v1_file(tmp_path / "v1.safetensors", tmp_path / "v2.safetensors")
    assert '"scale": 2.0' in capsys.readouterr().out
    loaded = SubspaceBank.load(tmp_path / "v2.safetensors")
    assert loaded.scale == 2.0 and loaded.attributes == bank.attributes and loaded.orthonormal
    for name, layer in bank.layers.items():
        assert torch.equal(loaded.layers[name].U, layer.U)


def test_schema_1_upgrade_still_validates(tmp_path):
    bank = make_bank()
    header = _write_v1(bank, tmp_path / "v1.safetensors")
    tensors = load_file(str(tmp_path / "v1.safetensors"))
    header["attributes"] = "abcd"
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={"attrspace": json.dumps(header)})
    with pytest.raises(BankFileError, match="attributes must be a list of str"):
        upgrade_v1_file(tmp_path / "v1.safetensors", tmp_path / "v2.safetensors")
    assert not (tmp_path / "v2.safetensors").exists()


# -- scales and constructors ------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -1.0])
def test_bad_scales_are_refused_everywhere(tmp_path, scale):
    bank = make_bank()
    with pytest.raises(ValueError, match=r"scale \(SubspaceBank\) must be finite and > 0"):
        SubspaceBank(bank.layers, bank.attributes, scale=scale)
    bank.save_official(tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match=r"scale \(load_official\) must be finite and > 0"):
        SubspaceBank.load_official(tmp_path / "o.safetensors", scale=scale)
    with pytest.raises(ValueError, match=r"scale \(SubspaceBank\) must be finite"):
        random_bank({"a": (4, 4)}, 2, scale=scale)
    bank.scale = scale  # changed after construction: save refuses before writing
    with pytest.raises(ValueError, match=r"scale \(SubspaceBank\) must be finite"):
        bank.save(tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()


def test_constructor_checks():
    u, v, cols = orthonormal(8, 2, 0), orthonormal(6, 2, 1), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="U holds NaN or Inf"):
        LayerSubspace(torch.full((8, 2), float("nan")), v, cols)
    with pytest.raises(TypeError, match="V must be a Tensor"):
        LayerSubspace(u, v.tolist(), cols)
    with pytest.raises(ValueError, match="column_attribute must be int64"):
        LayerSubspace(u, v, cols.int())
    with pytest.raises(TypeError, match="attributes must be a list or tuple"):
        SubspaceBank({"a": LayerSubspace(u, v, cols)}, attributes="abc")
    with pytest.raises(TypeError, match=r"scale \(SubspaceBank\) must be a real number"):
        SubspaceBank({"a": LayerSubspace(u, v, cols)}, scale="2")
    with pytest.raises(ValueError, match="at least one layer"):
        SubspaceBank({})
    with pytest.raises(TypeError, match="extra must be JSON-compatible"):
        SubspaceBank({"a": LayerSubspace(u, v, cols)}, extra={"t": (1, 2)})
    bank = SubspaceBank({"a": LayerSubspace(u, v, cols)})
    bank.layers["a"].U = torch.full((8, 2), float("inf"))
    with pytest.raises(ValueError, match="layer a: U holds NaN or Inf"):
        bank.validate()


def test_load_devices(tmp_path):
    path = tmp_path / "b.safetensors"
    make_bank().save(path)
    with pytest.raises(ValueError, match="device='meta' holds no data"):
        SubspaceBank.load(path, device="meta")
    with pytest.raises(ValueError, match="'bogus' is not a torch device"):
        SubspaceBank.load(path, device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            SubspaceBank.load(path, device="cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            SubspaceBank.load(path, device=f"cuda:{torch.cuda.device_count()}")
    loaded = SubspaceBank.load(path, device=torch.device("cpu"))
    assert loaded.layers["aggregator.frame_blocks.0.attn.qkv"].U.device.type == "cpu"
