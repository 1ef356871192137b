"""COLMAP sparse models (text and binary) of a rendered scene imported into the scene folder format
and compared with the render; COLMAP's own projection (pycolmap) checks the pixel convention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attrspace.data.colmap import import_colmap, model_encoding, read_colmap
from attrspace.data.families import family_specs
from attrspace.data.folder import SceneFormatError, read_scene
from attrspace.data.render import render_scene
from attrspace.data.storage import to_stored
from attrspace.geometry import project_points
from attrspace.models.vggt.pose import matrix_to_quaternion

pycolmap = pytest.importorskip("pycolmap", reason="pycolmap is in the [test] extra")

HW = (28, 42)
STEP = 5  # every 5th valid pixel of a view becomes a triangulated point


@pytest.fixture(scope="module")
def scene() -> dict:
    spec = family_specs("geometry", 1, 1, 3, seed=5)[0].scenes[0]
    return render_scene(spec, HW)


def observed_pixels(scene: dict, view: int) -> torch.Tensor:
    return scene["valid"][view].nonzero()[::STEP]  # (N, 2) rows, cols


def write_text_model(scene: dict, folder: Path, model: str = "PINHOLE", extra=()) -> None:
    """The render as COLMAP writes a sparse model: pixel centres at +0.5, quaternion w first."""
    folder.mkdir(parents=True)
    k = scene["intrinsics"][0].double()
    h, w = HW
    params = [k[0, 0], k[1, 1], k[0, 2] + 0.5, k[1, 2] + 0.5]
    if model != "PINHOLE":  # OPENCV-style models: fx fy cx cy then distortion
        params = [*params, *extra]
    cams = f"1 {model} {w} {h} " + " ".join(repr(float(p)) for p in params)
    (folder / "cameras.txt").write_text(f"# Camera list\n{cams}\n")
    lines, points, pid = ["# Image list"], ["# 3D point list"], 1
    for v in range(scene["extrinsics"].shape[0]):
        e = scene["extrinsics"][v].double()
        x, y, z, qw = matrix_to_quaternion(e[:, :3]).tolist()
        t = e[:, 3].tolist()
        lines.append(f"{v + 1} {qw!r} {x!r} {y!r} {z!r} {t[0]!r} {t[1]!r} {t[2]!r} 1 view_{v}.png")
        obs = []
        for idx, (r, c) in enumerate(observed_pixels(scene, v).tolist()):
            xyz = scene["world_points"][v, r, c].double().tolist()
            obs.append(f"{c + 0.5!r} {r + 0.5!r} {pid}")
            points.append(f"{pid} {xyz[0]!r} {xyz[1]!r} {xyz[2]!r} 128 128 128 0.1 {v + 1} {idx}")
            pid += 1
        lines.append(" ".join(obs))
    (folder / "images.txt").write_text("\n".join(lines) + "\n")
    (folder / "points3D.txt").write_text("\n".join(points) + "\n")


def write_images(scene: dict, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    stored = to_stored(scene)["images"]
    for v in range(stored.shape[0]):
        Image.fromarray(stored[v].permute(1, 2, 0).numpy()).save(folder / f"view_{v}.png")


@pytest.fixture(scope="module")
def models(scene, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colmap")
    write_text_model(scene, root / "text")
    pycolmap.Reconstruction(str(root / "text")).write_binary(str(_mk(root / "binary")))
    write_images(scene, root / "images")
    return {"text": root / "text", "binary": root / "binary", "images": root / "images"}


def _mk(p: Path) -> Path:
    p.mkdir()
    return p


@pytest.mark.parametrize("encoding", ["text", "binary"])
def test_import_matches_the_render(models, scene, encoding, tmp_path):
    assert model_encoding(models[encoding]) == encoding
    out = import_colmap(models[encoding], models["images"], tmp_path / "scene", depth="sparse")
    sample = read_scene(out)
    torch.testing.assert_close(sample["extrinsics"], scene["extrinsics"].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sample["intrinsics"], scene["intrinsics"].float(), rtol=0, atol=1e-5)
    assert torch.equal((sample["images"] * 255).round().to(torch.uint8), to_stored(scene)["images"])
    for v in range(3):
        rc = observed_pixels(scene, v)
        mask = torch.zeros(HW, dtype=torch.bool)
        mask[rc[:, 0], rc[:, 1]] = True
        assert torch.equal(sample["point_masks"][v], mask)
        torch.testing.assert_close(
            sample["depths"][v][mask], scene["depths"][v][mask], rtol=1e-5, atol=1e-5
        )


def test_pixel_convention_agrees_with_colmap(models, scene, tmp_path):
    """COLMAP's own projection of a point, minus half a pixel, is the folder format's."""
    out = import_colmap(models["binary"], models["images"], tmp_path / "scene")
    sample = read_scene(out)
    assert not sample["point_masks"].any()  # depth="none": camera loss only
    rec = pycolmap.Reconstruction(str(models["binary"]))
    pts = scene["world_points"][1][scene["valid"][1]][:20].double()
    ours, _ = project_points(
        pts, sample["intrinsics"][1].double(), sample["extrinsics"][1].double()
    )
    e = sample["extrinsics"][1].double()
    cam = (pts @ e[:, :3].T + e[:, 3]).numpy()
    theirs = np.stack([rec.cameras[1].img_from_cam(c) for c in cam])
    np.testing.assert_allclose(ours.numpy() + 0.5, theirs, atol=1e-4)


def test_distortion_is_refused_unless_zero(scene, models, tmp_path):
    write_text_model(scene, tmp_path / "d", "OPENCV", (0.1, 0.0, 0.0, 0.0))
    with pytest.raises(
        SceneFormatError, match=r"d/cameras.txt: camera 1: model OPENCV has distortion"
    ):
        read_colmap(tmp_path / "d")
    write_text_model(scene, tmp_path / "z", "OPENCV", (0.0, 0.0, 0.0, 0.0))
    out = import_colmap(tmp_path / "z", models["images"], tmp_path / "zs")
    torch.testing.assert_close(
        read_scene(out)["intrinsics"], scene["intrinsics"].float(), rtol=0, atol=1e-5
    )


def test_bad_models_and_images_name_the_file(scene, models, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "cameras.txt").write_text((models["text"] / "cameras.txt").read_text())
    with pytest.raises(
        SceneFormatError, match=r"partial: COLMAP model lacks images.txt, points3D.txt"
    ):
        read_colmap(partial)
    with pytest.raises(SceneFormatError, match="not a COLMAP sparse model"):
        read_colmap(tmp_path)
    broken = tmp_path / "broken"
    write_text_model(scene, broken)
    (broken / "cameras.txt").write_text("1 PINHOLE 42 28 x y z\n")
    with pytest.raises(SceneFormatError, match=r"broken: COLMAP model cannot be read"):
        read_colmap(broken)
    with pytest.raises(
        SceneFormatError, match=r"nowhere/view_0.png: image 'view_0.png' of the model"
    ):
        import_colmap(models["text"], tmp_path / "nowhere", tmp_path / "o1")
    small = tmp_path / "small"
    small.mkdir()
    from PIL import Image

    for v in range(3):
        Image.new("RGB", (20, 10)).save(small / f"view_{v}.png")
    with pytest.raises(
        SceneFormatError, match=r"small/view_0.png: image is 10x20 \(HxW\), its COLMAP"
    ):
        import_colmap(models["text"], small, tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
