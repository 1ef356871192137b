"""Scene specs: validation, exact JSON round trips, seeding, families that vary one attribute."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from attrspace.data.cameras import rig_extrinsics
from attrspace.data.families import (
    DOWNSTREAM_TASKS,
    FAMILIES,
    DatasetSpec,
    differing_attributes,
    family_specs,
)
from attrspace.data.sampling import CLEAR_HEIGHT, CLEAR_RADIUS
from attrspace.data.scene import ATTRIBUTES, CameraRig, Light, Primitive, SceneSpec, Texture
from attrspace.data.textures import evaluate_texture, hash_uniform
from attrspace.geometry import camera_centers


@pytest.mark.parametrize("family", FAMILIES)
def test_specs_round_trip_through_json_exactly(family):
    for ds in family_specs(family, 2, 2, 3, seed=7):
        for spec in ds.scenes:
            text = spec.to_json()
            back = SceneSpec.from_json(text)
            assert back == spec and back.to_json() == text
        back_ds = DatasetSpec.from_dict(json.loads(json.dumps(ds.to_dict())))
        assert back_ds == ds


def test_same_seed_same_specs_other_seed_other_specs():
    a = [d.to_dict() for d in family_specs("mixed", 2, 3, 4, seed=3)]
    b = [d.to_dict() for d in family_specs("mixed", 2, 3, 4, seed=3)]
    c = [d.to_dict() for d in family_specs("mixed", 2, 3, 4, seed=4)]
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(c)


def _leaves(obj, prefix=""):
    """Flatten a spec dict into {dotted path: value} to compare field by field."""
    if isinstance(obj, dict):
        return {
            k: v for key, val in obj.items() for k, v in _leaves(val, f"{prefix}{key}.").items()
        }
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in _leaves(val, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_family_datasets_differ_only_in_the_named_attribute(attribute):
    datasets = family_specs(attribute, 3, 4, 3, seed=1)
    # scene k of every dataset: the same draw of every attribute but the named one
    for d0, d1 in itertools.pairwise(datasets):
        assert d0.styles != d1.styles
        for s0, s1 in zip(d0.scenes, d1.scenes, strict=True):
            assert differing_attributes(s0, s1) == [attribute]
            a, b = _leaves(s0.to_dict()), _leaves(s1.to_dict())
            changed = {k.split(".")[0] for k in set(a) | set(b) if a.get(k) != b.get(k)}
            assert changed == {attribute}
    # inside a dataset the fixed attributes are drawn afresh for every scene
    for ds in datasets:
        for a, b in itertools.pairwise(ds.scenes):
            assert differing_attributes(a, b) == list(ATTRIBUTES)


def test_mixed_family_varies_everything():
    scenes = family_specs("mixed", 1, 4, 3, seed=2)[0].scenes
    for a, b in itertools.pairwise(scenes):
        assert differing_attributes(a, b) == list(ATTRIBUTES)


def test_fixed_attributes_do_not_depend_on_the_number_of_views():
    few = family_specs("texture", 2, 2, 2, seed=9)
    many = family_specs("texture", 2, 2, 6, seed=9)
    for a, b in zip(few, many, strict=True):
        for sa, sb in zip(a.scenes, b.scenes, strict=True):
            assert differing_attributes(sa, sb) == ["camera"]
            assert sa.camera.views == 2 and sb.camera.views == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_cameras_never_collide_with_geometry(family):
    for ds in family_specs(family, 2, 3, 4, seed=5):
        for spec in ds.scenes:
            for p in spec.geometry.primitives:
                bound = math.sqrt(sum(s * s for s in p.scale))
                assert math.hypot(*p.center[:2]) + bound <= CLEAR_RADIUS + 1e-9
                assert p.center[2] + bound <= CLEAR_HEIGHT + 1e-9
            eyes = camera_centers(rig_extrinsics(spec.camera))
            outside = (eyes[:, :2].norm(dim=1) > CLEAR_RADIUS) | (eyes[:, 2] > CLEAR_HEIGHT)
            inside_room = (eyes[:, :2].abs() < spec.geometry.room_half_extent).all(1) & (
                eyes[:, 2] > 0
            )
            assert outside.all() and inside_room.all()


def test_downstream_tasks_are_held_out_from_mining_families():
    mining = [
        s
        for a in (*ATTRIBUTES, "mixed")
        for d in family_specs(a, 2, 3, 3, seed=0)
        for s in d.scenes
    ]
    assert all(s.camera.kind != "handheld" for s in mining)
    assert all(m.texture.kind != "photo" for s in mining for m in s.texture.objects)
    micro = [s for d in family_specs("microbaseline", 2, 3, 5, seed=0) for s in d.scenes]
    for s in micro:
        eyes = camera_centers(rig_extrinsics(s.camera))
        baseline = (eyes - eyes[0]).norm(dim=1).max()
        assert s.camera.kind == "handheld" and 0 < baseline < 0.05 * s.camera.radius
    photo = [s for d in family_specs("photo", 1, 3, 2, seed=0) for s in d.scenes]
    assert all(m.texture.kind == "photo" for s in photo for m in s.texture.objects)
    assert set(DOWNSTREAM_TASKS) == {"microbaseline", "photo", "unusual_lighting"}


def test_bad_specs_and_arguments_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        Texture("plaid", ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), 1.0)
    with pytest.raises(ValueError, match="colors"):
        Texture("checker", ((0.0, 0.0, 2.0), (1.0, 1.0, 1.0)), 1.0)
    with pytest.raises(ValueError, match="image is required"):
        Texture("photo", ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), 1.0)
    with pytest.raises(ValueError, match="torus needs 1 shape values"):
        Primitive("torus", (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="tuple of 3 floats"):
        Primitive("box", (0, 0, 0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # ints are not silently cast
    with pytest.raises(ValueError, match="per_view"):
        CameraRig("random", 3, 60.0, (0.0, 0.0, 0.0), 3.0, 20.0, 0.0)
    with pytest.raises(ValueError, match="unit vector"):
        Light("directional", (1.0, 1.0, 0.0), (1.0, 1.0, 1.0), 1.0)
    spec = family_specs("mixed", 1, 1, 2, seed=0)[0].scenes[0].to_dict()
    spec["camera"]["zoom"] = 2.0
    with pytest.raises(ValueError, match="unknown \\['zoom'\\]"):
        SceneSpec.from_dict(spec)
    with pytest.raises(ValueError, match="unknown family"):
        family_specs("colour", 1, 1, 1, seed=0)
    with pytest.raises(ValueError, match="views must be an int >= 1"):
        family_specs("texture", 1, 1, 0, seed=0)


def test_hash_is_uniform_and_textures_are_pure_functions_of_the_point():
    cells = torch.stack(torch.meshgrid(*[torch.arange(-20, 20)] * 3, indexing="ij"), -1).reshape(
        -1, 3
    )
    u = hash_uniform(cells, seed=5)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts / len(u) - 0.1).abs().max() < 0.01
    assert not torch.equal(u, hash_uniform(cells, seed=6))
    pts = torch.rand(500, 3) * 4 - 2
    colors = ((0.1, 0.2, 0.3), (0.9, 0.8, 0.7), (0.5, 0.1, 0.9))
    for kind in ("checker", "stripes", "noise", "voronoi", "gradient"):
        tex = Texture(kind, colors, 2.0, (0.0, 0.6, 0.8), seed=3, octaves=3)
        a = evaluate_texture(tex, pts)
        b = torch.cat([evaluate_texture(tex, pts[:123]), evaluate_texture(tex, pts[123:])])
        assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
        assert a.std(0).max() > 0.05  # not constant
    # checker: the parity of the (phase-shifted) cell picks one of the two colours exactly
    tex = Texture("checker", colors[:2], 1.0, seed=3)
    out = evaluate_texture(tex, pts)
    is_first = (out - torch.tensor(colors[0])).abs().max(1).values < 1e-6
    is_second = (out - torch.tensor(colors[1])).abs().max(1).values < 1e-6
    assert (is_first ^ is_second).all() and 0.3 < is_first.float().mean() < 0.7
    # value noise is continuous: nearby points get nearby colours
    tex = Texture("noise", colors[:2], 1.0, seed=1, octaves=1)
    near = evaluate_texture(tex, pts + 1e-4) - evaluate_texture(tex, pts)
    assert near.abs().max() < 1e-2


def test_photo_texture_samples_the_scikit_image_photograph():
    skimage_data = pytest.importorskip("skimage.data", reason="photo textures need scikit-image")
    tex = Texture(
        "photo", ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), 1.0, (0.0, 0.0, 1.0), seed=0, image="coffee"
    )
    pts = torch.rand(4000, 3)
    albedo = evaluate_texture(tex, pts)
    photo = torch.from_numpy(skimage_data.coffee()).float() / 255.0
    # a planar projection samples every part of the photo: colour statistics match the image's
    assert torch.allclose(albedo.mean(0), photo.reshape(-1, 3).mean(0), atol=0.03)
    assert torch.equal(albedo, evaluate_texture(tex, pts))


def test_rig_kinds_produce_their_trajectories():
    target = (0.0, 0.0, 0.5)
    orbit = CameraRig("orbit", 5, 60.0, target, 3.0, 20.0, 0.0, 90.0)
    eyes = camera_centers(rig_extrinsics(orbit)).double()
    assert torch.allclose(
        (eyes - torch.tensor(target).double()).norm(dim=1),
        torch.full((5,), 3.0, dtype=torch.float64),
    )
    az = torch.rad2deg(torch.atan2(eyes[:, 1], eyes[:, 0]))
    assert torch.allclose(
        az, torch.tensor([0.0, 22.5, 45.0, 67.5, 90.0], dtype=torch.float64), atol=1e-9
    )
    fwd = CameraRig("forward", 4, 60.0, target, 3.0, 20.0, 45.0, step=0.2)
    ext = rig_extrinsics(fwd)
    eyes = camera_centers(ext)
    assert torch.allclose(
        (eyes[1:] - eyes[:-1]).norm(dim=1), torch.full((3,), 0.2, dtype=torch.float64)
    )
    assert torch.allclose(ext[:, 2, :3], ext[0, 2, :3].expand(4, 3))  # same optical axis
    steps = np.diff(eyes.numpy(), axis=0)
    assert np.allclose(steps / np.linalg.norm(steps, axis=1, keepdims=True), ext[0, 2, :3].numpy())
