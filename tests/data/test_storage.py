"""Shards, manifest, atomic writes, corruption errors and the VGGT sample dict."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from attrspace.data.families import family_specs, make_family
from attrspace.data.storage import (
    InMemoryMultiViewDataset,
    MultiViewDataset,
    ShardError,
    atomic_write_bytes,
    dataset_specs,
    read_manifest,
    write_family,
)
from attrspace.geometry import unproject_depth

ARGS = {
    "family": "geometry",
    "n_datasets": 2,
    "scenes_per_dataset": 3,
    "views": 2,
    "size": 28,
    "seed": 4,
}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("family")
    write_family(root, **ARGS, shard_scenes=2)
    return root


def _copy(src: Path, dst: Path) -> Path:
    for f in src.rglob("*"):
        if f.is_file():
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).write_bytes(f.read_bytes())
    return dst


def test_manifest_round_trip(family_dir):
    m = read_manifest(family_dir)
    assert (m["family"], m["seed"], m["views"], m["height"], m["width"]) == (
        "geometry",
        4,
        2,
        28,
        28,
    )
    assert dataset_specs(m) == family_specs("geometry", 2, 3, 2, seed=4)
    for ds in m["datasets"]:
        assert [s["scenes"] for s in ds["shards"]] == [2, 1]
        for s in ds["shards"]:
            data = (family_dir / s["file"]).read_bytes()
            assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)
    assert not list(family_dir.rglob("*.tmp-*"))


def test_samples_hold_what_vggt_training_needs(family_dir):
    data = MultiViewDataset(family_dir)
    assert len(data) == 6
    rendered = make_family(**{("attribute" if k == "family" else k): v for k, v in ARGS.items()})
    for i in (0, 4):
        sample = data[i]
        expect = {
            "images": ((2, 3, 28, 28), torch.float32),
            "depths": ((2, 28, 28), torch.float32),
            "extrinsics": ((2, 3, 4), torch.float32),
            "intrinsics": ((2, 3, 3), torch.float32),
            "cam_points": ((2, 28, 28, 3), torch.float32),
            "world_points": ((2, 28, 28, 3), torch.float32),
            "point_masks": ((2, 28, 28), torch.bool),
            "ids": ((2,), torch.int64),
        }
        for k, (shape, dtype) in expect.items():
            assert tuple(sample[k].shape) == shape and sample[k].dtype == dtype, k
        ds, scene = divmod(i, 3)
        assert sample["seq_name"] == f"geometry_{ds:02d}/scene_{scene:05d}"
        ref = rendered[ds].arrays
        assert (sample["images"] - ref["images"][scene]).abs().max() <= 0.5 / 255 + 1e-6
        assert torch.equal(sample["depths"], ref["depths"][scene])
        assert torch.equal(sample["extrinsics"], ref["extrinsics"][scene])
        assert torch.equal(sample["point_masks"], ref["depths"][scene] > 0)
        world = unproject_depth(sample["depths"], sample["intrinsics"], sample["extrinsics"])
        assert torch.allclose(
            sample["world_points"][sample["point_masks"]], world[sample["point_masks"]]
        )
        assert torch.equal(sample["cam_points"][..., 2], sample["depths"])
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=3)))
    assert batch["images"].shape == (3, 2, 3, 28, 28) and len(batch["seq_name"]) == 3
    memory = InMemoryMultiViewDataset(rendered)
    assert len(memory) == 6 and torch.equal(memory[4]["images"], rendered[1].arrays["images"][1])
    only = MultiViewDataset(family_dir, datasets=["geometry_01"])
    assert len(only) == 3 and torch.equal(only[0]["depths"], data[3]["depths"])
    with pytest.raises(ValueError, match="not in"):
        MultiViewDataset(family_dir, datasets=["texture_00"])


def test_same_seed_writes_identical_bytes(family_dir, tmp_path):
    write_family(tmp_path, **ARGS, shard_scenes=2)
    for f in family_dir.rglob("*.safetensors"):
        assert (tmp_path / f.relative_to(family_dir)).read_bytes() == f.read_bytes()
    assert (tmp_path / "manifest.json").read_bytes() == (family_dir / "manifest.json").read_bytes()


def test_truncated_shard_is_a_clear_error_naming_the_file(family_dir, tmp_path):
    root = _copy(family_dir, tmp_path)
    shard = root / "geometry_01" / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    data = MultiViewDataset(root)
    data[0]  # other shards still read
    with pytest.raises(ShardError, match=r"geometry_01/shard_00000\.safetensors is truncated"):
        data[3]


def test_tampered_shard_is_a_clear_error_naming_the_file(family_dir, tmp_path):
    root = _copy(family_dir, tmp_path)
    shard = root / "geometry_00" / "shard_00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # same length, one byte of pixel data changed
    shard.write_bytes(bytes(raw))
    with pytest.raises(
        ShardError, match=r"geometry_00/shard_00001\.safetensors does not match its sha256"
    ):
        MultiViewDataset(root)[2]
    # a shard whose manifest entry was updated to match but whose tensors have the wrong shape
    m = json.loads((root / "manifest.json").read_text())
    entry = m["datasets"][0]["shards"][1]
    entry["scenes"], m["datasets"][0]["shards"][0]["scenes"] = 2, 1
    entry["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"shard_00001\.safetensors: images is torch.uint8 \(1,"):
        MultiViewDataset(root)[1]


def test_interrupted_run_leaves_no_trace_and_keeps_the_old_family(family_dir, tmp_path):
    calls = []

    def crash():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        write_family(fresh, **ARGS, shard_scenes=1, on_scene=crash)
    assert not fresh.exists() and os.listdir(tmp_path) == []  # no folder, no stray shards
    # A failed overwrite leaves the old family whole: every shard still verifies.
    root = _copy(family_dir, tmp_path / "old")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        write_family(root, **{**ARGS, "seed": 5}, overwrite=True, on_scene=crash)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert len(MultiViewDataset(root)) == 6 and sorted(os.listdir(tmp_path)) == ["old"]


def test_replaced_family_holds_only_the_new_settings(family_dir, tmp_path):
    root = _copy(family_dir, tmp_path / "fam")
    with pytest.raises(FileExistsError, match=r"seed 4 -> 5.*pass overwrite=True"):
        write_family(root, **{**ARGS, "seed": 5})
    write_family(root, **{**ARGS, "n_datasets": 1, "seed": 5}, overwrite=True)
    m = read_manifest(root)
    assert (m["seed"], m["n_datasets"]) == (5, 1)
    assert sorted(p.name for p in root.iterdir()) == ["geometry_00", "manifest.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no family"):
        write_family(tmp_path / "other", **ARGS)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_atomic_write_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_existing_family_is_not_overwritten_silently(family_dir, tmp_path):
    root = _copy(family_dir, tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_family(root, **ARGS)
    with pytest.raises(ShardError, match="not valid JSON"):
        (root / "manifest.json").write_text("{")
        read_manifest(root)
