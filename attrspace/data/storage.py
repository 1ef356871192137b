"""Families on disk: safetensors shards plus a JSON manifest, and the torch Dataset that reads them.

Layout of a family folder:
    manifest.json                       written last: seed, family, sizes, every scene spec, and per
                                        shard its file, scene range, byte count and sha256
    <dataset name>/shard_00000.safetensors
                                        images uint8 (n, S, 3, H, W), depths float32 (n, S, H, W),
                                        extrinsics float32 (n, S, 3, 4),
                                        intrinsics float32 (n, S, 3, 3)

A family is written into a temporary folder beside its target and put in place by renames when it
is complete (attrspace._folders.staged_folder): an interrupted or failed run leaves the old family
(or nothing) and no stray shards, and a replaced family is never half old and half new. The
manifest is still written after all shards, so a folder without one is never a valid family. Images are stored as 8-bit (as
photo datasets are), so a loaded image is within 1/510 of the render.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from attrspace.data.families import (
    ARRAY_KEYS,
    DatasetSpec,
    RenderedDataset,
    family_specs,
    iter_rendered_scenes,
)
from attrspace.data.render import check_size
from attrspace.geometry import depth_to_camera_points, unproject_depth
from attrspace.util.files import (
    BadFileError,
    atomic_write_bytes,
    read_bytes,
    read_json,
    regular_file,
)
from attrspace.util.folders import staged_folder

FORMAT = "attrspace-multiview"
VERSION = 1
MANIFEST = "manifest.json"
STORED_DTYPES = {
    "images": torch.uint8,
    "depths": torch.float32,
    "extrinsics": torch.float32,
    "intrinsics": torch.float32,
}


class ShardError(ValueError):
    """A stored shard or manifest is missing, truncated, tampered with or inconsistent."""


def _scene_shapes(views: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    return {
        "images": (views, 3, height, width),
        "depths": (views, height, width),
        "extrinsics": (views, 3, 4),
        "intrinsics": (views, 3, 3),
    }


def to_stored(arrays: dict[str, Tensor]) -> dict[str, Tensor]:
    """Render outputs (any leading dims) -> the ARRAY_KEYS in their stored dtypes (8-bit images)."""
    out = {k: arrays[k].to(torch.float32).contiguous() for k in ARRAY_KEYS}
    out["images"] = (arrays["images"].clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).contiguous()
    return out


def write_shard(path: Path, stored: dict[str, Tensor]) -> dict:
    """Store one shard (tensors as to_stored returns them, stacked over scenes) atomically
    -> its manifest entry (byte count, sha256)."""
    for k in ARRAY_KEYS:
        if k not in stored or stored[k].dtype != STORED_DTYPES[k]:
            raise TypeError(f"write_shard: {k} must be a {STORED_DTYPES[k]} tensor (see to_stored)")
    data = st_save({k: stored[k].contiguous() for k in ARRAY_KEYS}, metadata={"format": FORMAT})
    atomic_write_bytes(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def family_settings(
    family: str,
    n_datasets: int,
    scenes_per_dataset: int,
    views: int,
    height: int,
    width: int,
    seed: int,
    content_streams: int = 1,
) -> dict:
    """The manifest fields that decide a family's contents (compared before writing over one)."""
    extra = {} if content_streams == 1 else {"content_streams": content_streams}
    return {
        "family": family,
        "n_datasets": n_datasets,
        "scenes_per_dataset": scenes_per_dataset,
        "views": views,
        "height": height,
        "width": width,
        "seed": seed,
        **extra,
    }


def check_family_target(root: Path, settings: dict, overwrite: bool, flag: str = "overwrite=True"):
    """Whether `root` may receive a family of `settings` -> "new", "same" (it already holds that
    family, every manifest field equal) or "replace" (overwrite set). Raises FileExistsError for a
    folder that holds another family (listing the differing settings and naming `flag`), or that
    is not empty and holds no family; NotADirectoryError when `root` is not a folder."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a folder")
    if not root.exists() or not any(root.iterdir()):
        return "new"
    if not (root / MANIFEST).exists():
        raise FileExistsError(
            f"{root} is not empty and holds no family ({MANIFEST}); choose a new or empty folder"
        )
    if overwrite:
        return "replace"
    try:
        stored = read_manifest(root)
    except ShardError as exc:
        raise FileExistsError(
            f"{root} holds a family that cannot be read ({exc}); pass {flag} to replace it"
        ) from exc
    differ = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in settings.items() if stored.get(k) != v]
    if differ:
        raise FileExistsError(
            f"{root} holds a family with other settings ({', '.join(differ)}); "
            f"pass {flag} to replace it, or choose another folder"
        )
    return "same"


def write_family(
    out: str | Path,
    family: str,
    n_datasets: int,
    scenes_per_dataset: int,
    views: int,
    size: int | tuple[int, int],
    seed: int,
    shard_scenes: int = 64,
    overwrite: bool = False,
    on_scene: Callable[[], None] | None = None,
    threads: int | None = None,
    content_streams: int = 1,
) -> dict:
    """Draw, render and store a family (see family_specs) scene by scene -> the manifest dict.

    shard_scenes: scenes per shard file; threads: passed to render_scene. `out` must be new or an
    empty folder; one that already holds a family is refused (FileExistsError) unless overwrite is
    set, and then replaced only once the new family is complete. Not locked: callers that may run
    concurrently on one folder hold attrspace._folders.folder_lock (the render command does)."""
    height, width = check_size(size)
    if not isinstance(shard_scenes, int) or shard_scenes < 1:
        raise ValueError(f"shard_scenes must be a positive int, got {shard_scenes!r}")
    root = Path(out)
    settings = family_settings(
        family, n_datasets, scenes_per_dataset, views, height, width, seed, content_streams
    )
    if check_family_target(root, settings, overwrite) == "same":
        raise FileExistsError(
            f"{root / MANIFEST} exists; pass overwrite=True to replace the family"
        )
    specs = family_specs(family, n_datasets, scenes_per_dataset, views, seed, content_streams)
    with staged_folder(root, lock=False) as tmp:  # callers lock (see above)
        entries = [
            _write_dataset(tmp, spec, (height, width), shard_scenes, on_scene, threads)
            for spec in specs
        ]
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            **settings,
            "arrays": {k: str(v).removeprefix("torch.") for k, v in STORED_DTYPES.items()},
            "datasets": entries,
        }
        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def _write_dataset(root: Path, spec: DatasetSpec, hw, shard_scenes: int, on_scene, threads):
    """Render and store one dataset's scenes in shards -> its manifest entry."""
    (root / spec.name).mkdir()
    shards, buffer, first = [], [], 0
    for k, scene in enumerate(iter_rendered_scenes(spec, hw, threads)):
        buffer.append(to_stored(scene))  # 8-bit images and no unused maps: small buffers
        if on_scene is not None:
            on_scene()
        if len(buffer) == shard_scenes or k == len(spec.scenes) - 1:
            rel = f"{spec.name}/shard_{len(shards):05d}.safetensors"
            stacked = {key: torch.stack([b[key] for b in buffer]) for key in ARRAY_KEYS}
            entry = write_shard(root / rel, stacked)
            shards.append({"file": rel, "first_scene": first, "scenes": len(buffer), **entry})
            first += len(buffer)
            buffer = []
    return {**spec.to_dict(), "shards": shards}


def read_manifest(root: str | Path) -> dict:
    """Load and validate a family's manifest (format, version, counts, shard coverage)."""
    path = Path(root) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path} not found: not a family folder, or a run that did not finish")
    try:
        m = read_json(path)  # the bounded reader: a FIFO, a device or deep nesting is refused
    except BadFileError as exc:
        raise ShardError(str(exc)) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ShardError(f"{path}: expected format {FORMAT!r} version {VERSION}")
    need = {
        "family",
        "seed",
        "n_datasets",
        "scenes_per_dataset",
        "views",
        "height",
        "width",
        "datasets",
    }
    if not need <= set(m):
        raise ShardError(f"{path}: missing keys {sorted(need - set(m))}")
    if len(m["datasets"]) != m["n_datasets"]:
        raise ShardError(
            f"{path}: {len(m['datasets'])} datasets listed, n_datasets = {m['n_datasets']}"
        )
    shard_keys = {"file", "first_scene", "scenes", "bytes", "sha256"}
    for ds in m["datasets"]:
        if not isinstance(ds, dict) or not {"name", "scenes", "shards"} <= set(ds):
            raise ShardError(f"{path}: a dataset entry lacks name, scenes or shards")
        for shard in ds["shards"]:
            if not isinstance(shard, dict) or set(shard) != shard_keys:
                raise ShardError(
                    f"{path}: dataset {ds['name']}: shard entries need {sorted(shard_keys)}"
                )
            rel = Path(shard["file"])
            if rel.is_absolute() or ".." in rel.parts:
                raise ShardError(f"{path}: shard path {shard['file']!r} leaves the family folder")
        covered = sum(s["scenes"] for s in ds["shards"])
        if len(ds["scenes"]) != m["scenes_per_dataset"] or covered != m["scenes_per_dataset"]:
            raise ShardError(
                f"{path}: dataset {ds['name']} has {len(ds['scenes'])} specs and "
                f"{covered} stored scenes, expected {m['scenes_per_dataset']}"
            )
    return m


def dataset_specs(manifest: dict) -> list[DatasetSpec]:
    """The DatasetSpecs stored in a manifest (validated dataclasses, exact floats)."""
    return [
        DatasetSpec.from_dict({k: ds[k] for k in ("name", "family", "index", "styles", "scenes")})
        for ds in manifest["datasets"]
    ]


def load_shard(root: str | Path, entry: dict, manifest: dict) -> dict[str, Tensor]:
    """Read one shard, check its size, checksum, keys, dtypes and shapes -> the stored tensors."""
    path = Path(root) / entry["file"]
    if not path.exists():
        raise ShardError(f"shard {path} is missing")
    try:  # the size is checked before a byte is read: a wrong file never fills memory
        size = regular_file(path).st_size
        data = read_bytes(path, limit=entry["bytes"]) if size == entry["bytes"] else b""
    except BadFileError as exc:
        raise ShardError(f"shard {exc}") from None
    if size != entry["bytes"] or len(data) != entry["bytes"]:
        raise ShardError(
            f"shard {path} is truncated or padded: {size} bytes, manifest says {entry['bytes']}"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ShardError(f"shard {path} does not match its sha256 checksum (corrupt or modified)")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise ShardError(f"shard {path} cannot be parsed: {exc}") from exc
    shapes = _scene_shapes(manifest["views"], manifest["height"], manifest["width"])
    if set(tensors) != set(ARRAY_KEYS):
        raise ShardError(f"shard {path} holds {sorted(tensors)}, expected {sorted(ARRAY_KEYS)}")
    for k in ARRAY_KEYS:
        t, want = tensors[k], (entry["scenes"], *shapes[k])
        if t.dtype != STORED_DTYPES[k] or tuple(t.shape) != want:
            raise ShardError(
                f"shard {path}: {k} is {t.dtype} {tuple(t.shape)}, "
                f"expected {STORED_DTYPES[k]} {want}"
            )
    return tensors


def make_sample(
    images: Tensor, depths: Tensor, extrinsics: Tensor, intrinsics: Tensor, seq_name: str
) -> dict:
    """One VGGT training sample (S views of H x W; keys and meanings as in VGGT's datasets):
    images float32 (S, 3, H, W) in [0, 1] (uint8 input is divided by 255); depths (S, H, W);
    extrinsics (S, 3, 4) camera-from-world; intrinsics (S, 3, 3); cam_points and world_points
    (S, H, W, 3) from the depth through attrspace.geometry; point_masks bool (S, H, W) =
    depth > 1e-8;
    ids (S,) int64 view indices; seq_name str."""
    if images.dtype == torch.uint8:
        images = images.to(torch.float32) / 255.0
    masks = depths > 1e-8
    cam = depth_to_camera_points(depths, intrinsics) * masks[..., None]
    world = unproject_depth(depths, intrinsics, extrinsics) * masks[..., None]
    return {
        "images": images,
        "depths": depths,
        "extrinsics": extrinsics,
        "intrinsics": intrinsics,
        "cam_points": cam,
        "world_points": world,
        "point_masks": masks,
        "ids": torch.arange(images.shape[0]),
        "seq_name": seq_name,
    }


class MultiViewDataset(torch.utils.data.Dataset):
    """Scenes of a stored family as VGGT sample dicts (see make_sample).

    root: a family folder written by write_family; datasets: names to keep (default: all).
    Shards are read, verified and kept in a small LRU cache of `cache_shards` entries."""

    def __init__(
        self, root: str | Path, datasets: Sequence[str] | None = None, cache_shards: int = 4
    ):
        if isinstance(datasets, str):
            raise TypeError("datasets must be a sequence of dataset names, not one string")
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        names = [d["name"] for d in self.manifest["datasets"]]
        unknown = sorted(set(datasets or ()) - set(names))
        if unknown:
            raise ValueError(f"datasets {unknown} are not in {self.root}; it holds {names}")
        self._index: list[tuple[str, dict, int]] = []  # (dataset name, shard entry, row in shard)
        for ds in self.manifest["datasets"]:
            if datasets is None or ds["name"] in datasets:
                for shard in ds["shards"]:
                    self._index += [(ds["name"], shard, r) for r in range(shard["scenes"])]
        self._cache: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self._cache_size = max(1, cache_shards)

    def __len__(self) -> int:
        return len(self._index)

    def _shard(self, entry: dict) -> dict[str, Tensor]:
        key = entry["file"]
        if key not in self._cache:
            self._cache[key] = load_shard(self.root, entry, self.manifest)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def __getitem__(self, i: int) -> dict:
        name, entry, row = self._index[_check_index(i, len(self))]
        arrays = self._shard(entry)
        return make_sample(
            *(arrays[k][row] for k in ("images", "depths", "extrinsics", "intrinsics")),
            seq_name=f"{name}/scene_{entry['first_scene'] + row:05d}",
        )


class InMemoryMultiViewDataset(torch.utils.data.Dataset):
    """The same samples over renders held in memory (make_family's output; images not quantised)."""

    def __init__(self, rendered: Sequence[RenderedDataset]):
        self._items = [(r, k) for r in rendered for k in range(len(r.spec.scenes))]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict:
        r, k = self._items[_check_index(i, len(self))]
        return make_sample(
            *(r.arrays[key][k] for key in ("images", "depths", "extrinsics", "intrinsics")),
            seq_name=f"{r.spec.name}/scene_{k:05d}",
        )


def _check_index(i: int, n: int) -> int:
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {n} scenes")
    return i % n
