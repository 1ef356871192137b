"""The ray caster: analytic cases, camera conventions, multi-view consistency, shading, bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attrspace.data.families import family_specs
from attrspace.data.intersect import PlacedPrimitive, intersect, intersect_room
from attrspace.data.render import render_scene
from attrspace.data.scene import (
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
from attrspace.geometry import camera_centers, pixel_grid, project_points, unproject_depth

GREY = Texture("checker", ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), 1.0)
MATTE = Material(GREY, 0.0, 16.0)
PLAIN = Appearance((MATTE,), MATTE, MATTE)
NO_ROT = (0.0, 0.0, 0.0)


def _scene(prims, camera, lights=(), ambient=(0.2, 0.2, 0.2)) -> SceneSpec:
    geo = Geometry(tuple(prims), 5.0, 2.0)
    return SceneSpec(geo, PLAIN, camera, Lighting(tuple(lights), ambient, (0.1, 0.2, 0.3)))


def _front_camera(distance: float, height: float, views: int = 1) -> CameraRig:
    # orbit at elevation 0 about (0, 0, height): the optical axis is horizontal through the target
    return CameraRig("orbit", views, 50.0, (0.0, 0.0, height), distance, 0.0, 0.0, 0.0)


def test_sphere_depth_at_image_centre_matches_closed_form():
    r, dist, h = 0.6, 3.0, 1.0
    spec = _scene([Primitive("sphere", (0.0, 0.0, h), NO_ROT, (r, r, r))], _front_camera(dist, h))
    out = render_scene(spec, 56)
    k = out["intrinsics"][0].double()
    # the 4 centre pixels have ray directions (+-0.5 / f, +-0.5 / f, 1): solve |t d - (0, 0, D)| = r
    d2 = 1.0 + 2 * (0.5 / k[0, 0].item()) ** 2
    t = (dist - math.sqrt(dist**2 - d2 * (dist**2 - r**2))) / d2
    centre = out["depths"][0, 27:29, 27:29]
    assert torch.allclose(
        centre.double(), torch.full((2, 2), t, dtype=torch.float64), rtol=1e-5, atol=0
    )
    # every sphere pixel lies on the sphere and its normal is the radial direction
    on = (out["world_points"][0] - torch.tensor([0.0, 0.0, h])).norm(dim=-1)
    mask = out["valid"][0] & (on < r + 0.01)
    assert mask.sum() > 100
    assert (on[mask] - r).abs().max() < 1e-4
    radial = (out["world_points"][0][mask] - torch.tensor([0.0, 0.0, h])) / r
    assert torch.allclose(out["normals"][0][mask], radial, atol=1e-3)


def test_floor_and_box_normals_are_exact_axes():
    box = Primitive("box", (0.0, 0.0, 0.6), NO_ROT, (0.4, 0.5, 0.3))
    cam = CameraRig("orbit", 1, 60.0, (0.0, 0.0, 0.3), 3.0, 35.0, 30.0)
    out = render_scene(_scene([box], cam), 84)
    pts, nrm, valid = out["world_points"][0], out["normals"][0], out["valid"][0]
    floor = valid & (pts[..., 2].abs() < 1e-4)
    assert floor.sum() > 500
    assert torch.equal(nrm[floor], torch.tensor([0.0, 0.0, 1.0]).expand(int(floor.sum()), 3))
    on_box = valid & (
        (pts - torch.tensor([0.0, 0.0, 0.6])).abs() <= torch.tensor([0.4, 0.5, 0.3]) + 1e-4
    ).all(-1)
    assert on_box.sum() > 300
    n = nrm[on_box]
    assert torch.allclose(n.abs().max(-1).values, torch.ones(len(n)), atol=1e-6)  # one axis, unit
    faces = {tuple(x) for x in n.round().int().tolist()}
    assert faces <= {(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)}
    assert len(faces) == 3  # a corner view sees three faces


def test_torus_and_superquadric_surfaces_satisfy_their_equations():
    torus = Primitive("torus", (0.0, -0.7, 0.6), (0.0, math.pi / 2, 0.0), (0.5, 0.5, 0.5), (0.3,))
    quad = Primitive("superquadric", (0.0, 0.8, 0.6), NO_ROT, (0.4, 0.4, 0.4), (0.5, 1.5))
    out = render_scene(_scene([torus, quad], _front_camera(3.2, 0.6)), 84)
    pts = out["world_points"][0][out["valid"][0]]
    # torus turned to face the camera on the x axis: tube radius 0.15 about a circle of radius 0.35
    # in the yz plane
    q = pts - torch.tensor([0.0, -0.7, 0.6])
    ring = torch.stack([torch.sqrt(q[:, 1] ** 2 + q[:, 2] ** 2) - 0.35, q[:, 0]], 1).norm(dim=1)
    near_torus = ring < 0.2
    assert near_torus.sum() > 150
    assert (ring[near_torus] - 0.15).abs().max() < 2e-3
    s = (pts - torch.tensor([0.0, 0.8, 0.6])) / 0.4
    # e1 = 0.5, e2 = 1.5: (|x|^(4/3) + |y|^(4/3))^3 + |z|^4 = 1
    f = (s[:, 0].abs() ** (4 / 3) + s[:, 1].abs() ** (4 / 3)) ** 3 + s[:, 2].abs() ** 4 - 1.0
    near_quad = (s.abs() < 1.05).all(1)
    assert near_quad.sum() > 150
    assert f[near_quad].abs().max() < 5e-3


def test_depth_world_points_and_pose_helpers_agree():
    spec = family_specs("mixed", 1, 1, 3, seed=5)[0].scenes[0]
    out = render_scene(spec, (56, 84))
    assert out["images"].shape == (3, 3, 56, 84) and out["depths"].shape == (3, 56, 84)
    valid = out["valid"]
    assert valid.float().mean() > 0.5
    assert torch.equal(valid, out["depths"] > 0)
    world = unproject_depth(out["depths"], out["intrinsics"], out["extrinsics"])
    scale = out["depths"][valid].max()
    assert (world - out["world_points"])[valid].abs().max() < 1e-5 * scale
    uv, z = project_points(out["world_points"].flatten(1, 2), out["intrinsics"], out["extrinsics"])
    grid = pixel_grid(56, 84).flatten(0, 1).expand(3, -1, -1)
    flat = valid.flatten(1)
    assert (uv - grid)[flat].abs().max() < 1e-3
    assert torch.allclose(z[flat], out["depths"].flatten(1)[flat], rtol=1e-5)
    norms = out["normals"].norm(dim=-1)
    assert torch.allclose(norms[valid], torch.ones(int(valid.sum())), atol=1e-5)
    assert torch.equal(norms[~valid], torch.zeros(int((~valid).sum())))


def _nearest_hit(spec: SceneSpec, origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    t, _ = intersect_room(origins, dirs, spec.geometry.room_half_extent, spec.geometry.wall_height)
    for p in spec.geometry.primitives:
        t = torch.minimum(t, intersect(PlacedPrimitive.from_spec(p), origins, dirs))
    return t


@pytest.mark.parametrize("seed", [1, 4])
def test_multi_view_consistency(seed):
    """Points seen by view i, seen from view j: the ray from camera j towards them stops there
    unless something nearer occludes them, and the pixel they project to shows the same point."""
    spec = family_specs("mixed", 1, 1, 3, seed=seed)[0].scenes[0]
    out = render_scene(spec, 56)
    h = w = 56
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            valid = out["valid"][i]
            x, normal = out["world_points"][i][valid], out["normals"][i][valid]
            uv, z = project_points(x, out["intrinsics"][j], out["extrinsics"][j])
            pix = uv.round().long()
            inside = (pix >= 0).all(1) & (pix[:, 0] < w) & (pix[:, 1] < h) & (z > 0)
            x, normal, z, pix = x[inside], normal[inside], z[inside], pix[inside]
            centre = camera_centers(out["extrinsics"][j])
            ray = (x - centre) / z[:, None]
            hit = _nearest_hit(spec, centre.expand_as(x), ray)
            # silhouette points (ray tangent to the surface) may be missed by a sampled root search
            cos = (torch.nn.functional.normalize(ray, dim=1) * normal).sum(1).abs()
            assert (hit[cos > 0.05] > z[cos > 0.05] * (1 + 1e-3)).sum() == 0
            visible = (hit - z).abs() < 1e-3 * z
            assert visible.sum() > 0.5 * len(z)
            footprint = z[visible] / out["intrinsics"][j, 0, 0]
            looked_up = out["world_points"][j][pix[visible, 1], pix[visible, 0]]
            gap = (looked_up - x[visible]).norm(dim=1) / footprint
            assert gap.median() < 0.6 and gap.quantile(0.9) < 1.3  # nearest-pixel rounding only


def test_lambert_and_cast_shadow_on_the_floor():
    elev = math.radians(50.0)
    light_dir = (math.cos(elev), 0.0, math.sin(elev))
    box = Primitive("box", (0.0, 0.0, 0.8), NO_ROT, (0.3, 0.3, 0.3))
    cam = CameraRig("orbit", 1, 70.0, (0.0, 0.0, 0.0), 3.2, 60.0, -90.0)
    light = Light("directional", light_dir, (1.0, 1.0, 1.0), 0.9)
    out = render_scene(_scene([box], cam, [light], ambient=(0.1, 0.1, 0.1)), 84)
    pts = out["world_points"][0]
    floor = out["valid"][0] & (pts[..., 2].abs() < 1e-4)
    q = pts[floor].double().numpy()
    # independent slab test: does the ray from the floor point towards the light meet the box?
    d = np.array(light_dir)
    t0 = (np.array([-0.3, -0.3, 0.5]) - q) / d.clip(1e-12)
    t1 = (np.array([0.3, 0.3, 1.1]) - q) / d.clip(1e-12)
    t0[:, 1], t1[:, 1] = np.where(np.abs(q[:, 1]) <= 0.3, -np.inf, np.inf), np.inf
    shadow = torch.from_numpy(np.minimum(t0, t1).max(1) <= np.maximum(t0, t1).min(1))
    rgb = out["images"][0].permute(1, 2, 0)[floor]
    lit = (0.5 * (0.1 + 0.9 * light_dir[2])) ** (1 / 2.2)
    dark = (0.5 * 0.1) ** (1 / 2.2)
    expect = torch.where(shadow, dark, lit).float()
    assert shadow.sum() > 30 and (~shadow).sum() > 1000
    agree = ((rgb - expect[:, None]).abs() < 1e-4).all(1)
    assert agree.float().mean() > 0.99  # only pixels on the shadow's edge may disagree


def test_background_pixels_are_invalid_and_coloured():
    cam = CameraRig("orbit", 1, 60.0, (0.0, 0.0, 2.5), 3.0, 20.0, 0.0)  # looking over the walls
    out = render_scene(_scene([Primitive("sphere", (0.0, 0.0, 0.5), NO_ROT, (0.3,) * 3)], cam), 56)
    sky = ~out["valid"][0]
    assert sky.sum() > 100
    assert torch.equal(out["depths"][0][sky], torch.zeros(int(sky.sum())))
    colour = out["images"][0].permute(1, 2, 0)[sky]
    assert torch.allclose(colour, torch.tensor([0.1, 0.2, 0.3]).expand_as(colour))


def test_same_spec_gives_identical_bytes_for_any_chunking_and_threads():
    spec = family_specs("mixed", 1, 1, 3, seed=11)[0].scenes[0]
    a = render_scene(spec, 56)
    b = render_scene(spec, 56, max_rays=56 * 56, threads=2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
    assert a["images"].min() >= 0 and a["images"].max() <= 1
    with pytest.raises(ValueError, match="threads must be a positive int"):
        render_scene(spec, 56, threads=0)


@pytest.mark.parametrize("size", [0, 50, (56, 57), "56", (56,)])
def test_sizes_must_be_multiples_of_14(size):
    spec = family_specs("mixed", 1, 1, 1, seed=0)[0].scenes[0]
    with pytest.raises(ValueError, match="multiples of 14"):
        render_scene(spec, size)


def test_camera_outside_the_room_is_rejected():
    cam = CameraRig("orbit", 1, 60.0, (0.0, 0.0, 0.5), 9.0, 10.0, 0.0)
    with pytest.raises(ValueError, match="outside the room"):
        render_scene(_scene([Primitive("sphere", (0.0, 0.0, 0.5), NO_ROT, (0.3,) * 3)], cam), 28)
