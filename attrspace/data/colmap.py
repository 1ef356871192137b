"""COLMAP sparse models (cameras, images, points3D; text or binary) -> the scene folder format of
`attrspace.data.folder`.

Reading is done by pycolmap, COLMAP's own Python bindings (the `[colmap]` extra: a manylinux
wheel, numpy its only dependency). It reads both encodings and every layout COLMAP has written,
including the rigs and frames of COLMAP >= 3.12, so this module only converts conventions:
- poses: COLMAP's `cam_from_world` is already OpenCV camera-from-world [R | t] (x right, y down,
  z forward), taken as it is;
- principal point: COLMAP puts the centre of the top-left pixel at (0.5, 0.5), the folder format
  at (0, 0), so cx and cy move by -0.5;
- camera models: pinhole models (SIMPLE_PINHOLE, PINHOLE) are taken; a model with distortion
  parameters is taken only when they are all 0, else refused (undistort first:
  `colmap image_undistorter` writes a PINHOLE model and undistorted images);
- depth: none (scenes train on the camera loss alone), or with depth="sparse" the z-depth of every
  triangulated observation at its pixel (0 elsewhere).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from attrspace.data.folder import SceneFormatError, read_image, write_scene

_PINHOLE = ("SIMPLE_PINHOLE", "PINHOLE")
# Perspective models whose distortion parameters may all be 0 (then they are pinhole cameras);
# fisheye models are not pinhole cameras even without distortion.
_PERSPECTIVE = (*_PINHOLE, "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV")
_FILES = ("cameras", "images", "points3D")


def _pycolmap():
    try:
        import pycolmap
    except ImportError as err:
        raise ImportError(
            "importing COLMAP models needs pycolmap: pip install 'attrspace[colmap]'"
        ) from err
    return pycolmap


def model_encoding(model_dir: str | Path) -> str:
    """ "text" or "binary": which of cameras/images/points3D .txt or .bin the folder holds (all
    three of one kind). Raises SceneFormatError naming the missing files."""
    model_dir = Path(model_dir)
    for ext, name in ((".bin", "binary"), (".txt", "text")):
        present = [f for f in _FILES if (model_dir / f"{f}{ext}").is_file()]
        if len(present) == len(_FILES):
            return name
        if present:
            missing = [f"{f}{ext}" for f in _FILES if f not in present]
            raise SceneFormatError(f"{model_dir}: COLMAP model lacks {', '.join(missing)}")
    raise SceneFormatError(
        f"{model_dir}: not a COLMAP sparse model (needs cameras, images, points3D as .txt or .bin)"
    )


def read_colmap(model_dir: str | Path) -> list[dict]:
    """A COLMAP sparse model -> one dict per registered image, sorted by image name: name,
    width, height, intrinsics (3, 3) float64 in the folder format's convention, extrinsics (3, 4)
    float64 camera-from-world, points (N, 2) pixel positions (folder convention) and depths (N,)
    camera z of its triangulated observations."""
    model_dir = Path(model_dir)
    ext = ".bin" if model_encoding(model_dir) == "binary" else ".txt"
    pycolmap = _pycolmap()
    try:
        rec = pycolmap.Reconstruction(str(model_dir))
    except (ValueError, RuntimeError, OSError) as exc:
        raise SceneFormatError(f"{model_dir}: COLMAP model cannot be read: {exc}") from exc
    intrinsics = {
        cid: _intrinsics(model_dir / f"cameras{ext}", cid, c) for cid, c in rec.cameras.items()
    }
    views = []
    for image_id, image in rec.images.items():
        if not _registered(image):
            continue  # no pose: nothing to train on
        pose = image.cam_from_world
        pose = pose() if callable(pose) else pose  # a method since pycolmap 3.12
        extrinsics = np.asarray(pose.matrix(), dtype=np.float64)
        if image.camera_id not in intrinsics:
            raise SceneFormatError(
                f"{model_dir / f'images{ext}'}: image {image_id} ({image.name}): camera_id "
                f"{image.camera_id} is not in cameras{ext}"
            )
        camera = rec.cameras[image.camera_id]
        pix, z = _observations(rec, image, extrinsics)
        views.append(
            {
                "name": image.name,
                "width": int(camera.width),
                "height": int(camera.height),
                "intrinsics": intrinsics[image.camera_id],
                "extrinsics": extrinsics,
                "points": pix,
                "depths": z,
            }
        )
    if not views:
        raise SceneFormatError(f"{model_dir / f'images{ext}'}: no registered image")
    return sorted(views, key=lambda v: v["name"])


def _registered(image) -> bool:
    """Whether an image has a pose (`has_pose` since pycolmap 3.12, `registered` before)."""
    flag = getattr(image, "has_pose", getattr(image, "registered", True))
    return bool(flag() if callable(flag) else flag)


def _intrinsics(path: Path, camera_id: int, camera) -> np.ndarray:
    name = getattr(camera, "model_name", None) or camera.model.name
    params = np.asarray(camera.params, dtype=np.float64)
    extra = params[list(camera.extra_params_idxs())]
    if name not in _PERSPECTIVE:
        raise SceneFormatError(
            f"{path}: camera {camera_id}: model {name} is not a perspective (pinhole) camera; "
            f"supported: {', '.join(_PERSPECTIVE)}"
        )
    if name not in _PINHOLE and np.any(extra != 0):
        raise SceneFormatError(
            f"{path}: camera {camera_id}: model {name} has distortion parameters {extra.tolist()}; "
            "undistort the images first (colmap image_undistorter writes a PINHOLE model)"
        )
    k = np.asarray(camera.calibration_matrix(), dtype=np.float64)
    k[0, 2] -= 0.5
    k[1, 2] -= 0.5
    return k


def _observations(rec, image, extrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions (folder convention) and camera z of the image's triangulated points."""
    pts = [p for p in image.points2D if p.has_point3D()]
    if not pts:
        return np.zeros((0, 2)), np.zeros(0)
    xy = np.asarray([p.xy for p in pts], dtype=np.float64) - 0.5
    xyz = np.asarray([rec.points3D[p.point3D_id].xyz for p in pts], dtype=np.float64)
    z = xyz @ extrinsics[2, :3] + extrinsics[2, 3]
    return xy, z


def sparse_depth(view: dict) -> np.ndarray:
    """(H, W) float32 z-depth at the pixels of a view's triangulated observations (nearest pixel;
    the closest point wins where two share one), 0 elsewhere and behind the camera."""
    depth = np.zeros((view["height"], view["width"]), dtype=np.float32)
    uv = np.rint(view["points"]).astype(np.int64)
    z = view["depths"]
    keep = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 1] >= 0)
    keep &= (uv[:, 0] < view["width"]) & (uv[:, 1] < view["height"])
    order = np.argsort(-z[keep])  # far first, so the nearest point is written last
    u, v, zk = uv[keep, 0][order], uv[keep, 1][order], z[keep][order]
    depth[v, u] = zk
    return depth


def import_colmap(
    model_dir: str | Path,
    images_dir: str | Path,
    out: str | Path,
    *,
    depth: str = "none",
    overwrite: bool = False,
) -> Path:
    """Convert a COLMAP sparse model and its images into one scene folder `out` (the format of
    `attrspace.data.folder`) -> `out`.

    model_dir: the folder with cameras/images/points3D (.txt or .bin), e.g. sparse/0;
    images_dir: the folder the model's image names are relative to; depth: "none" (camera loss
    only) or "sparse" (z of the triangulated points at their pixels). Registered images only, in
    name order; every image file must exist and have its camera's size. Nothing is written
    before every image has been checked."""
    if depth not in ("none", "sparse"):
        raise ValueError(f"depth must be 'none' or 'sparse', got {depth!r}")
    views = read_colmap(model_dir)
    images_dir = Path(images_dir)
    sizes = {(v["height"], v["width"]) for v in views}
    if len(sizes) > 1:
        raise SceneFormatError(
            f"{model_dir}: cameras have {len(sizes)} image sizes {sorted(sizes)}; the importer "
            "writes one size per scene (undistort to one size, or split the model)"
        )
    images = []
    for v in views:
        path = images_dir / v["name"]
        if not path.is_file():
            raise SceneFormatError(f"{path}: image {v['name']!r} of the model not found")
        image = read_image(path)
        if tuple(image.shape[-2:]) != (v["height"], v["width"]):
            raise SceneFormatError(
                f"{path}: image is {image.shape[-2]}x{image.shape[-1]} (HxW), its COLMAP camera "
                f"{v['height']}x{v['width']}"
            )
        images.append(image)
    depths = None
    if depth == "sparse":
        depths = torch.from_numpy(np.stack([sparse_depth(v) for v in views]))
    names = [
        re.sub(r"[^A-Za-z0-9._-]", "_", Path(v["name"]).with_suffix("").as_posix()) for v in views
    ]
    return write_scene(
        out,
        torch.stack(images),
        torch.from_numpy(np.stack([v["extrinsics"] for v in views])),
        torch.from_numpy(np.stack([v["intrinsics"] for v in views])),
        depths,
        names,
        overwrite=overwrite,
        source=f"COLMAP model {Path(model_dir).resolve()}",
    )
