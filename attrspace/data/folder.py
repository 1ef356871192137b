"""Your own multi-view data: a folder of images plus one JSON file of cameras per scene.

Layout of a scene folder (any names for the image and depth files; paths are relative to the
scene folder and may not leave it):

    my_scene/
      cameras.json
      images/0000.png  0001.jpg ...     RGB (RGBA is composited on white, grey becomes RGB)
      depth/0000.npy ...                optional: float32 (H, W) z-depth, 0 = no depth

cameras.json:

    {"format": "attrspace-scene", "version": 1,
     "views": [{"image": "images/0000.png",
                "intrinsics": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],
                "extrinsics": [[r11, r12, r13, t1], [r21, r22, r23, t2], [r31, r32, r33, t3]],
                "depth": "depth/0000.npy"},
               ...]}

Conventions (VGGT's and OpenCV's, those of `attrspace.geometry`):
- extrinsics: camera-from-world [R | t], a world point X maps to R X + t in the camera frame, with
  x right, y down, z forward; a 4 x 4 matrix with last row [0, 0, 0, 1] is accepted too.
- intrinsics: pixels, zero skew; pixel (u, v) = (column, row) has its centre at integer
  coordinates, so the centre of a W x H image is ((W - 1) / 2, (H - 1) / 2). (COLMAP puts pixel
  centres at +0.5: `attrspace.data.colmap` converts.)
- depth: z-depth along the optical axis in the unit of the translations t; 0 (or a missing file)
  marks pixels without depth. A scene whose views have no depth at all trains on the camera loss
  alone (`attrspace.train.losses.vggt_loss`).
- all views of a scene have one size, unless `read_scene(..., size=(H, W))` resizes them (the
  intrinsics follow; depth is resized by nearest neighbour so invalid pixels stay invalid).

A data root is either one scene folder or a folder of scene folders (each with a cameras.json).
Every file is checked when read; an error names the file and the field (`SceneFormatError`).
Reading images needs Pillow (the `[data]` extra).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from attrspace.data.storage import make_sample
from attrspace.util.files import BadFileError, atomic_write_bytes, read_json
from attrspace.util.folders import staged_folder

FORMAT = "attrspace-scene"
VERSION = 1
CAMERAS = "cameras.json"
CONVENTION = (
    "extrinsics: OpenCV camera-from-world [R|t] (x right, y down, z forward); intrinsics: pixels, "
    "pixel centres at integer coordinates; depth: z-depth in the unit of t, 0 = none"
)
_TOP_KEYS = {"format", "version", "views"}
_OPTIONAL_TOP = {"convention", "source"}
_VIEW_KEYS = {"image", "intrinsics", "extrinsics"}
_OPTIONAL_VIEW = {"depth"}
_ORTHO_TOL = 1e-3  # |R R^T - I| allowed: JSON of a float32 rotation is far inside it


class SceneFormatError(ValueError):
    """A scene folder's cameras.json, image or depth file is missing or does not hold what the
    format says; the message names the file and the field."""


def _fail(path: Path, field: str, msg: str) -> None:
    raise SceneFormatError(f"{path}: {field}: {msg}")


def _matrix(path: Path, field: str, value, rows: int, cols: int) -> np.ndarray:
    """A rows x cols list of finite numbers -> float64 array."""
    ok = isinstance(value, list) and len(value) == rows
    ok = ok and all(isinstance(r, list) and len(r) == cols for r in value)
    ok = ok and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for r in value for x in r
    )
    if not ok:
        _fail(path, field, f"must be a {rows} x {cols} list of numbers, got {value!r}"[:300])
    out = np.asarray(value, dtype=np.float64)
    if not np.isfinite(out).all():
        _fail(path, field, "holds NaN or infinite values")
    return out


def check_intrinsics(path: Path, field: str, value) -> np.ndarray:
    """[[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0 -> (3, 3) float64."""
    k = _matrix(path, field, value, 3, 3)
    if k[0, 0] <= 0 or k[1, 1] <= 0:
        _fail(path, field, f"focal lengths must be > 0, got fx={k[0, 0]}, fy={k[1, 1]}")
    if k[0, 1] != 0 or k[1, 0] != 0 or not np.array_equal(k[2], [0.0, 0.0, 1.0]):
        _fail(path, field, "must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] (zero skew)")
    return k


def check_extrinsics(path: Path, field: str, value) -> np.ndarray:
    """3 x 4 (or 4 x 4 with last row [0, 0, 0, 1]) camera-from-world [R | t] -> (3, 4) float64."""
    rows = len(value) if isinstance(value, list) else 0
    e = _matrix(path, field, value, 4 if rows == 4 else 3, 4)
    if rows == 4:
        if not np.array_equal(e[3], [0.0, 0.0, 0.0, 1.0]):
            _fail(path, field, f"a 4 x 4 matrix needs the last row [0, 0, 0, 1], got {e[3]}")
        e = e[:3]
    rot = e[:, :3]
    err = float(np.abs(rot @ rot.T - np.eye(3)).max())
    if err > _ORTHO_TOL:
        _fail(path, field, f"R is not a rotation (max |R R^T - I| = {err:.3g})")
    if np.linalg.det(rot) < 0:
        _fail(path, field, "R is a reflection (det -1), not a rotation")
    return e


def _inside(path: Path, field: str, folder: Path, rel) -> Path:
    if not isinstance(rel, str) or not rel:
        _fail(path, field, f"must be a relative file path, got {rel!r}")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        _fail(path, field, f"{rel!r} leaves the scene folder")
    if not (folder / p).is_file():
        _fail(path, field, f"file {folder / p} not found")
    return folder / p


def read_cameras(folder: str | Path) -> list[dict]:
    """Validate `folder`/cameras.json -> one dict per view: image and depth paths (depth None when
    absent), intrinsics (3, 3) and extrinsics (3, 4) float64 arrays."""
    folder = Path(folder)
    path = folder / CAMERAS
    if not path.exists():  # not is_file(): a FIFO is said to be one by the reader
        raise SceneFormatError(f"{path}: not found (a scene folder holds {CAMERAS})")
    try:
        doc = read_json(path)  # the bounded reader: a FIFO or a device is refused, not read
    except BadFileError as exc:
        raise SceneFormatError(str(exc)) from None
    if not isinstance(doc, dict):
        _fail(path, "top level", "must be a JSON object")
    missing, unknown = _TOP_KEYS - set(doc), set(doc) - _TOP_KEYS - _OPTIONAL_TOP
    if missing or unknown:
        _fail(path, "top level", f"missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    if doc["format"] != FORMAT or doc["version"] != VERSION:
        _fail(path, "format/version", f"expected {FORMAT!r} version {VERSION}")
    if not isinstance(doc["views"], list) or not doc["views"]:
        _fail(path, "views", "must be a non-empty list")
    return [_read_view(path, folder, i, v) for i, v in enumerate(doc["views"])]


def _read_view(path: Path, folder: Path, i: int, view) -> dict:
    where = f"views[{i}]"
    if not isinstance(view, dict):
        _fail(path, where, "must be an object")
    missing, unknown = _VIEW_KEYS - set(view), set(view) - _VIEW_KEYS - _OPTIONAL_VIEW
    if missing or unknown:
        _fail(path, where, f"missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    depth = view.get("depth")
    return {
        "image": _inside(path, f"{where}.image", folder, view["image"]),
        "depth": None if depth is None else _inside(path, f"{where}.depth", folder, depth),
        "intrinsics": check_intrinsics(path, f"{where}.intrinsics", view["intrinsics"]),
        "extrinsics": check_extrinsics(path, f"{where}.extrinsics", view["extrinsics"]),
    }


def _pil():
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(
            "reading scene images needs Pillow: pip install 'attrspace[data]'"
        ) from err
    return Image


def read_image(path: Path) -> Tensor:
    """An image file -> uint8 (3, H, W) RGB; transparency is composited on white (as VGGT does)."""
    image_mod = _pil()
    try:
        with image_mod.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                white = image_mod.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = image_mod.alpha_composite(white, rgba)
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise SceneFormatError(f"{path}: image: cannot be read ({exc})") from exc
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def read_depth(path: Path, hw: tuple[int, int]) -> Tensor:
    """A .npy depth map -> float32 (H, W); must match the image size `hw`, be finite and >= 0."""
    if path.suffix != ".npy":
        raise SceneFormatError(f"{path}: depth: must be a .npy file (float32 H x W)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SceneFormatError(f"{path}: depth: cannot be read ({exc})") from exc
    if arr.ndim != 2 or tuple(arr.shape) != tuple(hw) or arr.dtype.kind != "f":
        raise SceneFormatError(
            f"{path}: depth: must be a float (H, W) = {tuple(hw)} array, "
            f"got {arr.dtype} {tuple(arr.shape)}"
        )
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise SceneFormatError(f"{path}: depth: values must be finite and >= 0 (0 = no depth)")
    return torch.from_numpy(arr.astype(np.float32))


def resize_view(
    image: Tensor, intrinsics: Tensor, depth: Tensor | None, size: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Resize one view to size = (H, W): image (3, h, w) uint8 or float -> float32 in [0, 1]
    (bilinear, antialiased), intrinsics scaled with integer pixel centres (u' = (u + 0.5) s - 0.5),
    depth by nearest neighbour (pixel-centre aligned, so 0 stays "no depth")."""
    h, w = image.shape[-2:]
    new_h, new_w = size
    img = image.to(torch.float32) / (255.0 if image.dtype == torch.uint8 else 1.0)
    if (h, w) == (new_h, new_w):
        return img, intrinsics, depth
    img = F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)
    sx, sy = new_w / w, new_h / h
    k = intrinsics.clone()
    k[0, 0], k[1, 1] = k[0, 0] * sx, k[1, 1] * sy
    k[0, 2], k[1, 2] = (k[0, 2] + 0.5) * sx - 0.5, (k[1, 2] + 0.5) * sy - 0.5
    if depth is not None:
        depth = F.interpolate(depth[None, None], size=size, mode="nearest-exact")[0, 0]
    return img[0].clamp(0.0, 1.0), k, depth


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"size must be None, a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def read_scene(
    folder: str | Path,
    size: int | tuple[int, int] | None = None,
    views: Sequence[int] | None = None,
) -> dict:
    """A scene folder -> one VGGT training sample (`attrspace.data.storage.make_sample`: images
    float32 (S, 3, H, W) in [0, 1], depths (S, H, W) (zeros where there is none), extrinsics
    (S, 3, 4), intrinsics (S, 3, 3), point_masks, world_points, ..., seq_name = the folder name).

    size: (H, W) to resize every view to (see resize_view), or None: every view must already have
    one size. views: indices of the views to read (default all, in file order)."""
    folder = Path(folder)
    size = _check_size(size)
    cams = read_cameras(folder)
    chosen = range(len(cams)) if views is None else list(views)
    bad = [i for i in chosen if not (isinstance(i, int) and 0 <= i < len(cams))]
    if bad or not chosen:
        raise ValueError(f"views {list(chosen)} do not index the {len(cams)} views of {folder}")
    images, depths, ks, es = [], [], [], []
    for i in chosen:
        image = read_image(cams[i]["image"])
        hw = tuple(image.shape[-2:])
        depth = None if cams[i]["depth"] is None else read_depth(cams[i]["depth"], hw)
        k = torch.from_numpy(cams[i]["intrinsics"])
        if size is None and images and hw != tuple(images[0].shape[-2:]):
            raise SceneFormatError(
                f"{cams[i]['image']}: image: size {hw[0]}x{hw[1]} differs from the first view's "
                f"{images[0].shape[-2]}x{images[0].shape[-1]}; pass size=(H, W) to resize"
            )
        image, k, depth = resize_view(image, k, depth, size or hw)
        images.append(image)
        depths.append(torch.zeros(image.shape[-2:]) if depth is None else depth)
        ks.append(k)
        es.append(torch.from_numpy(cams[i]["extrinsics"]))
    return make_sample(
        torch.stack(images),
        torch.stack(depths).to(torch.float32),
        torch.stack(es).to(torch.float32),
        torch.stack(ks).to(torch.float32),
        seq_name=folder.name,
    )


def find_scenes(root: str | Path) -> list[Path]:
    """The scene folders of a data root: the root itself when it holds a cameras.json, else its
    sub-folders that hold one (sorted by name). Raises SceneFormatError when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise SceneFormatError(f"{root}: not a folder")
    if (root / CAMERAS).is_file():
        return [root]
    scenes = sorted(p for p in root.iterdir() if p.is_dir() and (p / CAMERAS).is_file())
    if not scenes:
        raise SceneFormatError(
            f"{root}: holds no {CAMERAS}, and no sub-folder holds one (see attrspace.data.folder)"
        )
    return scenes


class SceneFolderDataset(torch.utils.data.Dataset):
    """The scenes of a data root (see the module docstring) as VGGT training samples.

    root: one scene folder or a folder of them; size: (H, W) every view is resized to (None: as
    stored); frames: views per sample (None: all views of a scene). With `frames`, every scene is
    cut into len(views) // frames samples; sample j of a scene holds `frames` distinct views
    drawn by a generator seeded with (seed, scene index, j), so an index always gives the same
    views. Every cameras.json is validated here, before any training step; images and depth
    files are checked when read."""

    def __init__(
        self,
        root: str | Path,
        size: int | tuple[int, int] | None = None,
        frames: int | None = None,
        seed: int = 0,
    ):
        if frames is not None and (not isinstance(frames, int) or frames < 1):
            raise ValueError(f"frames must be None or a positive int, got {frames!r}")
        self.size = _check_size(size)
        self.scenes = find_scenes(root)
        self.frames, self.seed = frames, seed
        self._items: list[tuple[int, list[int] | None]] = []
        for s, folder in enumerate(self.scenes):
            n = len(read_cameras(folder))
            if frames is None:
                self._items.append((s, None))
                continue
            if n < frames:
                raise SceneFormatError(f"{folder / CAMERAS}: views: {n} views, frames={frames}")
            for j in range(n // frames):
                g = torch.Generator().manual_seed(hash_seed(seed, s, j))
                self._items.append((s, torch.randperm(n, generator=g)[:frames].tolist()))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        s, views = self._items[i % len(self)]
        return read_scene(self.scenes[s], self.size, views)


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and machines, unlike hash())."""
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return value


_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def write_scene(
    folder: str | Path,
    images: Tensor,
    extrinsics: Tensor,
    intrinsics: Tensor,
    depths: Tensor | None = None,
    names: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    source: str | None = None,
) -> Path:
    """Write one scene in the folder format -> the folder.

    images (S, 3, H, W) uint8 or float in [0, 1] (written as PNG), extrinsics (S, 3, 4)
    camera-from-world, intrinsics (S, 3, 3) (conventions in the module docstring), depths
    (S, H, W) or None; names: file stems per view (default 0000, 0001, ...). The folder is built
    beside its target and put in place in one rename; an existing folder is refused unless
    overwrite. The result is read back and checked before it replaces anything."""
    folder = Path(folder)
    s = _check_scene_arrays(images, extrinsics, intrinsics, depths)
    names = [f"{i:04d}" for i in range(s)] if names is None else list(names)
    if len(names) != s or len(set(names)) != s or not all(_NAME.match(n) for n in names):
        raise ValueError(f"names must be {s} distinct file stems of [A-Za-z0-9._-], got {names}")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True")
    image_mod = _pil()
    if images.dtype != torch.uint8:
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    with staged_folder(folder) as tmp:
        (tmp / "images").mkdir()
        views = []
        for i, name in enumerate(names):
            array = images[i].permute(1, 2, 0).contiguous().numpy()
            image_mod.fromarray(array, "RGB").save(tmp / "images" / f"{name}.png")
            view = {
                "image": f"images/{name}.png",
                "intrinsics": intrinsics[i].double().tolist(),
                "extrinsics": extrinsics[i].double().tolist(),
            }
            if depths is not None:
                (tmp / "depth").mkdir(exist_ok=True)
                np.save(tmp / "depth" / f"{name}.npy", depths[i].to(torch.float32).numpy())
                view["depth"] = f"depth/{name}.npy"
            views.append(view)
        doc = {"format": FORMAT, "version": VERSION, "convention": CONVENTION, "views": views}
        if source:
            doc["source"] = source
        atomic_write_bytes(tmp / CAMERAS, json.dumps(doc, indent=1).encode())
        read_scene(tmp)  # a file this function cannot read back is never put in place
    return folder


def _check_scene_arrays(images, extrinsics, intrinsics, depths) -> int:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (S, 3, H, W), got {getattr(images, 'shape', images)}")
    s, _, h, w = images.shape
    if tuple(extrinsics.shape) != (s, 3, 4) or tuple(intrinsics.shape) != (s, 3, 3):
        raise ValueError(
            f"extrinsics must be ({s}, 3, 4) and intrinsics ({s}, 3, 3), got "
            f"{tuple(extrinsics.shape)} and {tuple(intrinsics.shape)}"
        )
    if depths is not None and tuple(depths.shape) != (s, h, w):
        raise ValueError(f"depths must be ({s}, {h}, {w}), got {tuple(depths.shape)}")
    if not (
        math.isfinite(float(extrinsics.abs().sum()))
        and math.isfinite(float(intrinsics.abs().sum()))
    ):
        raise ValueError("extrinsics and intrinsics must be finite")
    return s
