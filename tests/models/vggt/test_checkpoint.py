"""State-dict layout of the full model (against the official key list, built on the meta device) and
checkpoint loading from tiny synthetic files written in the official layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from attrspace.models.vggt import VGGT, VGGTConfig
from attrspace.models.vggt.checkpoint import load_checkpoint, normalize_key

# Key names and shapes of the official VGGT-1B checkpoint (all 1,797 tensors, no weights).
KEYS_TSV = Path(__file__).parents[2] / "fixtures" / "vggt_1b_state_dict_keys.tsv"


def _official_keys() -> dict[str, tuple[int, ...]]:
    rows = [line.rstrip("\n").split("\t") for line in KEYS_TSV.read_text().splitlines()[1:]]
    return {key: tuple(int(d) for d in shape.split("x")) for key, shape, _ in rows}


def test_vggt_1b_on_meta_has_the_official_keys_and_shapes():
    official = _official_keys()
    assert len(official) == 1797
    with torch.device("meta"):
        model = VGGT(VGGTConfig.vggt_1b())
    state = model.state_dict()
    assert all(t.is_meta for t in state.values())  # nothing allocated
    mine = {k: tuple(t.shape) for k, t in state.items()}
    expected = {k: s for k, s in official.items() if not k.startswith("track_head.")}
    assert len(official) - len(expected) == 394  # the track head is not built
    assert sorted(set(expected) - set(mine)) == []
    assert sorted(set(mine) - set(expected)) == []
    assert [k for k in expected if mine[k] != expected[k]] == []
    # Adapted Linears are plain nn.Linear under their official names.
    qkv = model.get_submodule("aggregator.frame_blocks.7.attn.qkv")
    assert type(qkv) is torch.nn.Linear and qkv.weight.shape == (3072, 1024)


@pytest.fixture(scope="module")
def source() -> VGGT:
    torch.manual_seed(3)
    model = VGGT(VGGTConfig.tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def _state(model: VGGT) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # Keys of the official track head (tiny stand-in shapes) must be skipped, not refused.
    state["track_head.feature_extractor.norm.weight"] = torch.ones(8)
    state["track_head.tracker.updateformer.virual_tracks"] = torch.zeros(1, 4, 1, 8)
    return state


def _fresh(seed: int = 11, **changes) -> VGGT:
    torch.manual_seed(seed)
    return VGGT(VGGTConfig.tiny(**changes)).eval()


def _assert_same_outputs(a: VGGT, b: VGGT) -> None:
    x = torch.rand(1, 2, 3, 28, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    for key in ("pose_enc", "depth", "depth_conf", "world_points"):
        torch.testing.assert_close(out_a[key], out_b[key], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["plain", "trainer", "ddp", "peft", "safetensors"])
def test_round_trip_in_every_layout(tmp_path, source, layout):
    state = _state(source)
    if layout == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    if layout == "peft":
        state = {
            f"base_model.model.{k.replace('attn.qkv.', 'attn.qkv.base_layer.')}": v
            for k, v in state.items()
        }
        state["base_model.model.aggregator.frame_blocks.0.attn.qkv.lora_A.default.weight"] = (
            torch.zeros(4, 64)
        )
    if layout == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        path = tmp_path / "model.pt"
        torch.save({"model": state, "epoch": 3} if layout == "trainer" else state, path)
    target = _fresh()
    report = load_checkpoint(target, path)
    assert report.ok and report.skipped == {"track_head": 2}
    assert len(report.loaded) == len(source.state_dict())
    assert "track_head" in str(report)
    if layout in ("ddp", "peft"):
        assert report.renamed == len(state) - (layout == "peft")
    if layout == "peft":
        assert len(report.adapter_keys) == 1
    _assert_same_outputs(source, target)


def test_meta_model_takes_the_loaded_tensors(tmp_path, source):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in _state(source).items()}, path)
    with torch.device("meta"):
        target = VGGT(VGGTConfig.tiny()).eval()
    load_checkpoint(target, path)
    assert not any(t.is_meta for t in target.state_dict().values())
    assert not target.aggregator._resnet_mean.is_meta
    assert not target.aggregator.patch_embed.mask_token.requires_grad
    _assert_same_outputs(source, target)


def test_torch_files_are_memory_mapped(tmp_path, source, monkeypatch):
    path = tmp_path / "model.pt"
    torch.save(_state(source), path)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(_fresh(), path)
    assert seen and seen[0].get("mmap") is True and seen[0].get("weights_only") is True


def test_misfits_are_refused_before_anything_changes(tmp_path, source):
    state = _state(source)
    state["aggregator.frame_blocks.0.attn.qkv.weight"] = torch.zeros(10, 64)
    del state["camera_head.trunk_norm.bias"]
    state["aggregator.extra_thing"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    target = _fresh()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_checkpoint(target, path)
    message = str(err.value)
    assert "aggregator.frame_blocks.0.attn.qkv.weight: file (10, 64), model (192, 64)" in message
    assert "missing: camera_head.trunk_norm.bias" in message
    assert "unexpected: aggregator.extra_thing" in message
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k
    report = load_checkpoint(target, path, strict=False)
    assert not report.ok and len(report.mismatched) == 1
    assert report.missing == ["camera_head.trunk_norm.bias"]
    assert torch.equal(target.camera_head.trunk_norm.weight, source.camera_head.trunk_norm.weight)


def test_keys_of_disabled_heads_are_skipped(tmp_path, source):
    path = tmp_path / "model.pt"
    torch.save(_state(source), path)
    target = _fresh(enable_point=False)
    report = load_checkpoint(target, path)
    n_point = sum(k.startswith("point_head.") for k in source.state_dict())
    assert report.skipped == {"track_head": 2, "point_head": n_point}


def test_unreadable_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(_fresh(), tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_checkpoint(_fresh(), junk)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_checkpoint(_fresh(), tmp_path / "list.pt")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="safetensors"):
        load_checkpoint(_fresh(), bad_st)


def test_normalize_key():
    assert normalize_key("module.module.camera_head.x") == "camera_head.x"
    assert normalize_key("base_model.model.a.qkv.base_layer.weight") == "a.qkv.weight"
    assert normalize_key("aggregator.camera_token") == "aggregator.camera_token"


def _snapshot(folder: Path, source: VGGT, shards: int = 1, config: dict | None = None) -> Path:
    """A Hugging Face snapshot folder as PyTorchModelHubMixin writes it (config.json holds the
    official constructor's arguments), optionally sharded with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = source.config
    if config is None:
        config = {
            "img_size": cfg.img_size,
            "patch_size": cfg.patch_size,
            "embed_dim": cfg.embed_dim,
        }
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in _state(source).items()}
    if shards == 1:
        save_file(state, folder / "model.safetensors")
        return folder
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, folder / name)
        weight_map |= dict.fromkeys(part, name)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("shards", [1, 3])
def test_snapshot_folder_loads(tmp_path, source, shards):
    folder = _snapshot(tmp_path / "snap", source, shards)
    with torch.device("meta"):
        target = VGGT(VGGTConfig.tiny()).eval()
    report = load_checkpoint(target, folder)
    assert report.ok and report.skipped == {"track_head": 2}
    assert len(report.files) == shards and report.path == str(folder)
    assert len(report.loaded) == len(source.state_dict())
    _assert_same_outputs(source, target)


def test_snapshot_folders_that_do_not_fit_are_refused_before_anything_changes(tmp_path, source):
    target = _fresh()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    wrong = _snapshot(tmp_path / "wrong", source, config={"embed_dim": 128, "patch_size": 14})
    with pytest.raises(
        ValueError, match=r"config.json: embed_dim is 128, the model was built with 64"
    ):
        load_checkpoint(target, wrong)
    (wrong / "config.json").write_text('["not", "an", "object"]')
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object"):
        load_checkpoint(target, wrong)
    (wrong / "config.json").write_text('{"img_size": "518"}')
    with pytest.raises(ValueError, match="img_size must be a positive integer"):
        load_checkpoint(target, wrong)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"must hold model\.safetensors"):
        load_checkpoint(target, empty)

    sharded = _snapshot(tmp_path / "sharded", source, shards=2)
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    some_key = next(iter(index["weight_map"]))
    for weight_map, error, message in (
        ({**index["weight_map"], some_key: "../model.safetensors"}, ValueError, "not a file name"),
        ({**index["weight_map"], some_key: "absent.safetensors"}, FileNotFoundError, "absent"),
        ({k: v for k, v in index["weight_map"].items() if k != some_key}, ValueError, "index"),
        ({}, ValueError, "weight_map"),
    ):
        index_path.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(error, match=message):
            load_checkpoint(target, sharded)
    index_path.write_text("{truncated")
    with pytest.raises(ValueError, match="not a readable JSON file"):
        load_checkpoint(target, sharded)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_hub_id_downloads_a_snapshot(tmp_path, source, monkeypatch):
    import huggingface_hub  # in the [test] extra (and needed by peft)

    folder = _snapshot(tmp_path / "cache" / "snap", source)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)  # "facebook/VGGT-1B" must not exist as a local path
    target = _fresh()
    report = load_checkpoint(target, "facebook/VGGT-1B", revision="main")
    assert report.ok and report.path == f"facebook/VGGT-1B (snapshot {folder})"
    ((repo_id, kwargs),) = calls
    assert repo_id == "facebook/VGGT-1B" and kwargs["revision"] == "main"
    assert "model.safetensors" in kwargs["allow_patterns"]
    assert "model.pt" not in kwargs["allow_patterns"]  # the duplicate 5 GB file stays remote
    _assert_same_outputs(source, target)

    def offline(repo_id, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match=r"facebook/VGGT-1B.*ConnectionError: network is unreachable"):
        load_checkpoint(_fresh(), "facebook/VGGT-1B")
    # A missing local weight file is never taken for a hub id.
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(_fresh(), "runs/model.safetensors")
    with pytest.raises(ValueError, match="revision='main' applies to hub ids only"):
        load_checkpoint(_fresh(), folder, revision="main")


def test_hub_id_without_huggingface_hub_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImportError, match=r"pip install 'attrspace\[hub\]'"):
        load_checkpoint(_fresh(), "facebook/VGGT-1B")
