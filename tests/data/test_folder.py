"""The scene folder format: a rendered scene written, read back and compared; resizing keeps the
geometry; every kind of bad input gives an error naming the file and the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from attrspace.data.families import family_specs
from attrspace.data.folder import (
    SceneFolderDataset,
    SceneFormatError,
    read_scene,
    write_scene,
)
from attrspace.data.render import render_scene
from attrspace.data.storage import make_sample
from attrspace.geometry import project_points

HW = (28, 42)


def rendered(views: int = 3, seed: int = 0) -> dict:
    spec = family_specs("geometry", 1, 1, views, seed=seed)[0].scenes[0]
    return render_scene(spec, HW)


@pytest.fixture(scope="module")
def scene() -> dict:
    return rendered()


@pytest.fixture
def folder(tmp_path, scene) -> Path:
    return write_scene(
        tmp_path / "s", scene["images"], scene["extrinsics"], scene["intrinsics"], scene["depths"]
    )


def test_round_trip_matches_the_render(folder, scene):
    sample = read_scene(folder)
    want = make_sample(
        scene["images"],
        scene["depths"],
        scene["extrinsics"].float(),
        scene["intrinsics"].float(),
        "s",
    )
    assert sample["seq_name"] == "s"
    assert (sample["images"] - scene["images"]).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG
    for key in ("depths", "extrinsics", "intrinsics", "world_points", "point_masks"):
        assert torch.equal(sample[key], want[key]), key
    assert sample["point_masks"].any()


def test_without_depth_every_pixel_is_invalid(tmp_path, scene):
    folder = write_scene(tmp_path / "nd", scene["images"], scene["extrinsics"], scene["intrinsics"])
    sample = read_scene(folder)
    assert not sample["point_masks"].any()
    assert torch.equal(sample["depths"], torch.zeros(3, *HW))
    assert not (folder / "depth").exists()


def test_resize_keeps_projections_and_depth(folder, scene):
    sample = read_scene(folder, size=(14, 21))
    assert sample["images"].shape == (3, 3, 14, 21)
    pts = scene["world_points"][0][scene["valid"][0]][:50]  # points seen by view 0
    uv, _ = project_points(pts, scene["intrinsics"][0].float(), scene["extrinsics"][0].float())
    uv2, _ = project_points(pts, sample["intrinsics"][0], sample["extrinsics"][0])
    torch.testing.assert_close(uv2, (uv + 0.5) * 0.5 - 0.5, rtol=0, atol=1e-4)
    # nearest-exact: resized pixel i takes source pixel floor((i + 0.5) * 2) = 2i + 1
    torch.testing.assert_close(sample["depths"], scene["depths"][:, 1::2, 1::2])


def test_dataset_frames_are_distinct_and_repeatable(tmp_path):
    a, b = rendered(4, 1), rendered(5, 2)
    for name, r in (("a", a), ("b", b)):
        write_scene(tmp_path / name, r["images"], r["extrinsics"], r["intrinsics"])
    data = SceneFolderDataset(tmp_path, frames=2, seed=3)
    assert len(data) == 2 + 2
    first = data[2]
    assert first["seq_name"] == "b" and first["images"].shape[0] == 2
    assert torch.equal(first["images"], SceneFolderDataset(tmp_path, frames=2, seed=3)[2]["images"])
    views = data._items[2][1]
    assert len(set(views)) == 2
    torch.testing.assert_close(first["extrinsics"], b["extrinsics"][views].float())
    assert len(SceneFolderDataset(tmp_path / "a")) == 1
    with pytest.raises(SceneFormatError, match=r"b/cameras.json: views: 5 views, frames=6"):
        SceneFolderDataset(tmp_path / "b", frames=6)
    with pytest.raises(SceneFormatError, match=r"holds no cameras\.json"):
        SceneFolderDataset(tmp_path / "a" / "images")


def _edit(folder: Path, fn) -> None:
    doc = json.loads((folder / "cameras.json").read_text())
    fn(doc)
    (folder / "cameras.json").write_text(json.dumps(doc))


def _set(view: int, key: str, value):
    return lambda d: d["views"][view].__setitem__(key, value)


EYE = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
CAMERA_CASES = {
    "format": (lambda d: d.__setitem__("format", "x"), "cameras.json: format/version"),
    "unknown top key": (
        lambda d: d.__setitem__("cams", 1),
        r"top level: .*unknown keys \['cams'\]",
    ),
    "no views": (lambda d: d.__setitem__("views", []), "views: must be a non-empty list"),
    "missing intrinsics": (
        lambda d: d["views"][1].pop("intrinsics"),
        r"views\[1\]: missing keys \['intrinsics'\]",
    ),
    "unknown view key": (_set(0, "mask", "m.png"), r"views\[0\]: .*unknown keys \['mask'\]"),
    "intrinsics shape": (
        _set(2, "intrinsics", [[1, 0], [0, 1]]),
        r"views\[2\].intrinsics: must be a 3 x 3",
    ),
    "focal": (
        _set(0, "intrinsics", [[0, 0, 1], [0, 5, 1], [0, 0, 1]]),
        r"views\[0\].intrinsics: focal lengths must be > 0",
    ),
    "skew": (
        _set(0, "intrinsics", [[5, 1, 1], [0, 5, 1], [0, 0, 1]]),
        r"views\[0\].intrinsics: .*zero skew",
    ),
    "nan": (
        _set(1, "extrinsics", [[float("nan"), 0, 0, 0], *EYE[1:]]),
        r"views\[1\].extrinsics: holds NaN",
    ),
    "not a rotation": (
        _set(1, "extrinsics", [[2.0, 0, 0, 0], *EYE[1:]]),
        r"views\[1\].extrinsics: R is not a rotation",
    ),
    "reflection": (
        _set(1, "extrinsics", [[-1.0, 0, 0, 0], *EYE[1:]]),
        r"views\[1\].extrinsics: R is a reflection",
    ),
    "4x4 last row": (
        _set(1, "extrinsics", [*EYE, [0, 0, 1, 1]]),
        r"views\[1\].extrinsics: a 4 x 4 matrix needs the last row",
    ),
    "image leaves": (_set(0, "image", "../x.png"), r"views\[0\].image: '../x.png' leaves"),
    "image missing": (
        _set(0, "image", "images/zz.png"),
        r"views\[0\].image: file .*zz.png not found",
    ),
    "depth missing": (_set(2, "depth", "depth/none.npy"), r"views\[2\].depth: file .* not found"),
}


@pytest.mark.parametrize("case", sorted(CAMERA_CASES))
def test_bad_cameras_json_names_file_and_field(folder, case):
    edit, pattern = CAMERA_CASES[case]
    _edit(folder, edit)
    with pytest.raises(SceneFormatError, match=pattern):
        read_scene(folder)


def test_bad_files_name_the_file(folder):
    (folder / "cameras.json").write_text("{not json")
    with pytest.raises(SceneFormatError, match=r"s/cameras.json: not valid JSON"):
        read_scene(folder)
    (folder / "cameras.json").unlink()
    with pytest.raises(SceneFormatError, match=r"s/cameras.json: not found"):
        read_scene(folder)


def test_bad_image_and_depth_files(folder, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(folder, good)
    (folder / "images" / "0001.png").write_bytes(b"not an image")
    with pytest.raises(SceneFormatError, match=r"images/0001.png: image: cannot be read"):
        read_scene(folder)
    cases = {
        "shape": (np.zeros((3, 3), np.float32), r"depth/0002.npy: depth: must be a float \(H, W\)"),
        "negative": (-np.ones(HW, np.float32), r"depth/0002.npy: depth: values must be finite"),
        "ints": (np.ones(HW, np.int32), r"depth/0002.npy: depth: must be a float"),
    }
    for arr, pattern in cases.values():
        np.save(good / "depth" / "0002.npy", arr)
        with pytest.raises(SceneFormatError, match=pattern):
            read_scene(good)


def test_mixed_sizes_need_a_size(tmp_path, scene):
    folder = write_scene(tmp_path / "m", scene["images"], scene["extrinsics"], scene["intrinsics"])
    from PIL import Image

    Image.new("RGB", (40, 30)).save(folder / "images" / "0001.png")
    with pytest.raises(SceneFormatError, match=r"images/0001.png: image: size 30x40 differs"):
        read_scene(folder)
    assert read_scene(folder, size=(14, 28))["images"].shape == (3, 3, 14, 28)


def test_write_scene_refuses_bad_arrays_and_existing_folders(folder, scene):
    with pytest.raises(FileExistsError, match="not empty"):
        write_scene(folder, scene["images"], scene["extrinsics"], scene["intrinsics"])
    with pytest.raises(ValueError, match=r"extrinsics must be \(3, 3, 4\)"):
        write_scene(
            folder.parent / "x", scene["images"], scene["extrinsics"][:2], scene["intrinsics"]
        )
    with pytest.raises(ValueError, match="names must be 3 distinct"):
        write_scene(
            folder.parent / "x",
            scene["images"],
            scene["extrinsics"],
            scene["intrinsics"],
            names=["a", "a", "b"],
        )
    assert not (folder.parent / "x").exists()
