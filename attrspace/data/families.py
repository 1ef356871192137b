"""Families of datasets in which exactly one scene attribute varies, plus the mixed family (for
pre-training) and the held-out downstream tasks (never used for mining).

Seeding: every draw comes from its own numpy stream keyed by (seed, family, dataset, scene,
attribute), so a spec never depends on the order of draws, on the number of views of another
attribute, or on which other datasets are generated. Inside dataset d of family a, scene k takes
attribute a from the dataset's own stream (dataset d, scene index k + 1, drawn with the dataset's
style) and every other attribute from a stream that depends on the scene index k alone, shared by
all datasets of the family. So the fixed attributes change from scene to scene (a LoRA cannot learn
one constant target), and scene k of every dataset of family a differs only in attribute a: the
datasets differ only in the distribution of the varied attribute.

content_streams = C > 1 controls content instead: dataset d of every attribute family draws its
fixed attributes from content stream d mod C, keyed by (stream, scene index) and shared across
families, not by family. LoRAs of one attribute then see different content (C >= datasets: no two
share a stream), and a LoRA of another attribute with the same stream index sees the same draws, so
a similarity between two LoRAs can be compared between pairs that share no content.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from attrspace.data import sampling as smp
from attrspace.data.render import check_size, render_scene
from attrspace.data.scene import ATTRIBUTES, SceneSpec

MIXED = "mixed"
DOWNSTREAM_TASKS = ("microbaseline", "photo", "unusual_lighting")
FAMILIES = (*ATTRIBUTES, MIXED, *DOWNSTREAM_TASKS)
_FAMILY_CODE = {name: i for i, name in enumerate(FAMILIES)}
_ATTR_CODE = {name: i for i, name in enumerate(ATTRIBUTES)}
_STYLE_STREAM = 99
# Streams of the attributes held fixed in an attribute family: keyed by scene index, not dataset.
_SHARED_STREAM = 200
# Family code of the cross-family content streams (content_streams > 1): no family has it.
_CONTENT_CODE = len(FAMILIES)

MICROBASELINE_CAMERA = {
    "kind": "handheld",
    "fov_deg": [20.0, 35.0],
    "radius": [2.8, 3.4],
    "elevation_deg": [10.0, 35.0],
    "span_deg": [0.0, 0.0],
    "walk_step": 0.02,
    "turn_deg": 0.3,
}
PHOTO_TEXTURE = {
    "kinds": ["photo"],
    "hue": 0.0,
    "hue_spread": 0.5,
    "frequency": [0.6, 1.2],
    "specular": [0.0, 0.3],
}

# The arrays a rendered dataset keeps, with the shapes of one scene (S views, H x W pixels).
ARRAY_KEYS = ("images", "depths", "extrinsics", "intrinsics")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a family: its name, the style of its varying attribute and its scene specs."""

    name: str
    family: str
    index: int
    styles: dict
    scenes: tuple[SceneSpec, ...]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "index": self.index,
            "styles": self.styles,
            "scenes": [s.to_dict() for s in self.scenes],
        }

    @classmethod
    def from_dict(cls, d: dict) -> DatasetSpec:
        want = {"name", "family", "index", "styles", "scenes"}
        if not isinstance(d, dict) or set(d) != want:
            raise ValueError(
                f"DatasetSpec: expected a dict with keys {sorted(want)}, "
                f"got {sorted(d) if isinstance(d, dict) else d!r}"
            )
        scenes = tuple(SceneSpec.from_dict(s) for s in d["scenes"])
        return cls(d["name"], d["family"], d["index"], d["styles"], scenes)


@dataclass
class RenderedDataset:
    """A dataset spec with its renders: arrays[k] has shape (N scenes, S, ...) as in render_scene
    (images float32 in [0, 1] (N, S, 3, H, W), depths (N, S, H, W), extrinsics (N, S, 3, 4),
    intrinsics (N, S, 3, 3))."""

    spec: DatasetSpec
    arrays: dict[str, Tensor] = field(repr=False)


def _rng(seed: int, family: str, dataset: int, scene: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, _FAMILY_CODE[family], dataset, scene, stream])


def _draw(attribute: str, rng: np.random.Generator, views: int, style: dict):
    if attribute == "geometry":
        return smp.draw_geometry(rng, style)
    if attribute == "texture":
        return smp.draw_appearance(rng, style, room_style=smp.DEFAULT_STYLES["texture"])
    if attribute == "camera":
        return smp.draw_camera(rng, views, style)
    return smp.draw_lighting(rng, style)


def _check_args(
    family: str, n_datasets: int, scenes_per_dataset: int, views: int, seed: int
) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    for name, value, lo in (
        ("n_datasets", n_datasets, 1),
        ("scenes_per_dataset", scenes_per_dataset, 1),
        ("views", views, 1),
        ("seed", seed, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _mixed_scene(family: str, seed: int, d: int, k: int, views: int) -> tuple[SceneSpec, dict]:
    """Every attribute drawn afresh (with a random style); downstream tasks override one of them."""
    styles = {
        a: smp.draw_style(a, _rng(seed, family, d, k, _STYLE_STREAM + i))
        for i, a in enumerate(ATTRIBUTES)
    }
    if family == "microbaseline":
        styles["camera"] = MICROBASELINE_CAMERA
    if family == "photo":
        styles["texture"] = PHOTO_TEXTURE
    parts = {
        a: _draw(a, _rng(seed, family, d, k, _ATTR_CODE[a]), views, styles[a]) for a in ATTRIBUTES
    }
    if family == "unusual_lighting":
        parts["lighting"] = smp.draw_unusual_lighting(
            _rng(seed, family, d, k, _ATTR_CODE["lighting"])
        )
        styles["lighting"] = {"unusual": True}
    return SceneSpec(**parts), styles


def shared_attributes(
    family: str, scene: int, views: int, seed: int, stream: int | None = None
) -> dict:
    """The attributes other than `family` of scene index `scene` (default styles). stream None:
    the family's own stream, one per scene index and attribute, shared by every dataset of the
    family; stream c: content stream c, the same draws in every family (no family in the key)."""

    def rng(a: str) -> np.random.Generator:
        code = _SHARED_STREAM + _ATTR_CODE[a]
        if stream is None:
            return _rng(seed, family, 0, scene, code)
        return np.random.default_rng([seed, _CONTENT_CODE, stream, scene, code])

    return {a: _draw(a, rng(a), views, smp.DEFAULT_STYLES[a]) for a in ATTRIBUTES if a != family}


def content_stream(dataset: int, content_streams: int) -> int | None:
    """The content stream of dataset `dataset` of an attribute family (None: the family's own)."""
    return None if content_streams == 1 else dataset % content_streams


def family_specs(
    family: str,
    n_datasets: int,
    scenes_per_dataset: int,
    views: int,
    seed: int,
    content_streams: int = 1,
) -> list[DatasetSpec]:
    """The scene specs of a family (no rendering).

    family: an attribute (texture / geometry / camera / lighting): dataset d draws that field of
    scene k from its own style, the other three fields of scene k are the same in every dataset
    (shared_attributes) and change with k; with content_streams C > 1 they come from content stream
    d mod C instead (the same in every family, see the module doc);
    "mixed": everything varies; or a held-out downstream task (microbaseline / photo /
    unusual_lighting)."""
    _check_args(family, n_datasets, scenes_per_dataset, views, seed)
    if (
        not isinstance(content_streams, int)
        or isinstance(content_streams, bool)
        or content_streams < 1
    ):
        raise ValueError(f"content_streams must be an int >= 1, got {content_streams!r}")
    out = []
    for d in range(n_datasets):
        if family in ATTRIBUTES:
            style = smp.draw_style(family, _rng(seed, family, d, 0, _STYLE_STREAM))
            scenes = []
            for k in range(scenes_per_dataset):
                fixed = shared_attributes(
                    family, k, views, seed, content_stream(d, content_streams)
                )
                varied = _draw(
                    family, _rng(seed, family, d, k + 1, _ATTR_CODE[family]), views, style
                )
                scenes.append(SceneSpec(**fixed, **{family: varied}))
            styles = {family: style}
        else:
            pairs = [_mixed_scene(family, seed, d, k, views) for k in range(scenes_per_dataset)]
            scenes = [p[0] for p in pairs]
            styles = {"per_scene": [p[1] for p in pairs]}
        out.append(DatasetSpec(f"{family}_{d:02d}", family, d, styles, tuple(scenes)))
    return out


def iter_rendered_scenes(
    spec: DatasetSpec, size: int | tuple[int, int], threads: int | None = None
) -> Iterator[dict[str, Tensor]]:
    """Render the scenes of a dataset one at a time (dicts as render_scene returns)."""
    for scene in spec.scenes:
        yield render_scene(scene, size, threads=threads)


def render_dataset(
    spec: DatasetSpec,
    size: int | tuple[int, int],
    on_scene: Callable[[], None] | None = None,
    threads: int | None = None,
) -> RenderedDataset:
    """Render every scene of the dataset and stack ARRAY_KEYS along a new scene dim."""
    check_size(size)
    parts: dict[str, list[Tensor]] = {k: [] for k in ARRAY_KEYS}
    for out in iter_rendered_scenes(spec, size, threads):
        for k in ARRAY_KEYS:
            parts[k].append(out[k])
        if on_scene is not None:
            on_scene()
    return RenderedDataset(spec, {k: torch.stack(v) for k, v in parts.items()})


def make_family(
    attribute: str,
    n_datasets: int,
    scenes_per_dataset: int,
    views: int,
    size: int | tuple[int, int],
    seed: int,
    on_scene: Callable[[], None] | None = None,
    threads: int | None = None,
    content_streams: int = 1,
) -> list[RenderedDataset]:
    """Draw and render a whole family in memory (see family_specs for the meaning of `attribute`).

    on_scene is called after every rendered scene (e.g. a progress bar's update); threads is
    passed to render_scene."""
    check_size(size)
    specs = family_specs(attribute, n_datasets, scenes_per_dataset, views, seed, content_streams)
    return [render_dataset(s, size, on_scene, threads) for s in specs]


def differing_attributes(a: SceneSpec, b: SceneSpec) -> list[str]:
    """The attribute fields in which two scene specs differ."""
    return [name for name in ATTRIBUTES if getattr(a, name) != getattr(b, name)]
