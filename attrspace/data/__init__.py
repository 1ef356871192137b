"""Synthetic multi-view data with controlled variation (docs/design.md §9).

A SceneSpec (geometry, texture, camera, lighting) is drawn from seeded numpy streams, rendered by a
vectorised torch ray caster (render_scene), grouped into families in which one attribute varies
(family_specs, make_family), stored as safetensors shards with a manifest (write_family) and read
back as VGGT training samples (MultiViewDataset). Your own scenes (images + cameras, depth optional)
are read from the folder format of `attrspace.data.folder` (SceneFolderDataset); COLMAP models are
converted into it by `attrspace.data.colmap.import_colmap`. Nothing here imports scikit-image or Pillow unless
a photo texture or a contact sheet is asked for.
"""

from attrspace.data.families import (
    DOWNSTREAM_TASKS,
    FAMILIES,
    MIXED,
    DatasetSpec,
    RenderedDataset,
    differing_attributes,
    family_specs,
    make_family,
    render_dataset,
)
from attrspace.data.folder import SceneFolderDataset, SceneFormatError, read_scene, write_scene
from attrspace.data.render import render_scene
from attrspace.data.scene import (
    ATTRIBUTES,
    Appearance,
    CameraRig,
    Geometry,
    Light,
    Lighting,
    Material,
    Primitive,
    SceneSpec,
    Texture,
)
from attrspace.data.storage import (
    InMemoryMultiViewDataset,
    MultiViewDataset,
    ShardError,
    make_sample,
    read_manifest,
    write_family,
)

__all__ = [
    "ATTRIBUTES",
    "DOWNSTREAM_TASKS",
    "FAMILIES",
    "MIXED",
    "Appearance",
    "CameraRig",
    "DatasetSpec",
    "Geometry",
    "InMemoryMultiViewDataset",
    "Light",
    "Lighting",
    "Material",
    "MultiViewDataset",
    "Primitive",
    "RenderedDataset",
    "SceneFolderDataset",
    "SceneFormatError",
    "SceneSpec",
    "ShardError",
    "Texture",
    "differing_attributes",
    "family_specs",
    "make_family",
    "make_sample",
    "read_manifest",
    "read_scene",
    "render_dataset",
    "render_scene",
    "write_family",
    "write_scene",
]
