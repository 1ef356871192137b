"""A vectorised torch ray caster: one primary ray per pixel centre, Lambert + Blinn-Phong shading,
hard shadows from every light, all views of a scene batched into one set of rays.

Conventions are those of attrspace.geometry: the ray of pixel (u, v) has camera-frame direction
((u - cx) / fx, (v - cy) / fy, 1), so its hit parameter t is the z-depth and unproject_depth of the
depth map reproduces the rendered world points.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from attrspace.data.cameras import rig_extrinsics, rig_intrinsics
from attrspace.data.intersect import (
    PlacedPrimitive,
    dot,
    intersect,
    intersect_room,
    pow_,
    world_normals,
)
from attrspace.data.scene import Light, Material, SceneSpec
from attrspace.data.textures import evaluate_texture
from attrspace.geometry import camera_centers, pixel_grid

PATCH = 14  # VGGT's patch size: image sides must be multiples of it
_SHADOW_OFFSET = 1e-3
_GAMMA = 1.0 / 2.2
MAX_RAYS = 1 << 18  # views are rendered in chunks of at most this many rays (memory bound)
# Intra-op threads used by default. Measured on a 2-core CPU (bench/bench_render.py): a second
# thread gains nothing at 56 px and at most ~1.6x at 224 px when the machine is otherwise idle,
# but when other processes share the cores its hand-offs between hundreds of small ops make a
# render 2-10x slower. Pass threads=2 to render_scene when the cores are yours.
DEFAULT_THREADS = 1


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """An int or (H, W) -> (H, W), each a positive multiple of 14."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 and s % PATCH == 0 for s in hw):
        raise ValueError(
            f"image size must be positive multiples of {PATCH} (int or (H, W)), got {size!r}"
        )
    return hw  # type: ignore[return-value]


def camera_rays(
    intrinsics: Tensor, extrinsics: Tensor, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """intrinsics (S, 3, 3), extrinsics (S, 3, 4) (float64) -> origins, directions (S*H*W, 3)
    float32.

    Directions have camera-frame z = 1 (not unit length), in world coordinates."""
    uv = pixel_grid(height, width, dtype=torch.float64)  # (H, W, 2)
    fx, fy = intrinsics[:, 0, 0, None, None], intrinsics[:, 1, 1, None, None]
    cx, cy = intrinsics[:, 0, 2, None, None], intrinsics[:, 1, 2, None, None]
    d_cam = torch.stack(
        [
            (uv[..., 0] - cx) / fx,
            (uv[..., 1] - cy) / fy,
            torch.ones_like(uv[..., 0]).expand(len(fx), -1, -1),
        ],
        dim=-1,
    )  # (S, H, W, 3)
    # world direction = R^T d_cam
    dirs = torch.einsum("shwi,sij->shwj", d_cam, extrinsics[:, :3, :3])
    origins = camera_centers(extrinsics)[:, None, None, :].expand_as(dirs)
    return origins.reshape(-1, 3).to(torch.float32), dirs.reshape(-1, 3).to(torch.float32)


def _check_eyes(spec: SceneSpec, extrinsics: Tensor) -> None:
    half = spec.geometry.room_half_extent
    for k, eye in enumerate(camera_centers(extrinsics).tolist()):
        if not (abs(eye[0]) < half and abs(eye[1]) < half and eye[2] > 0.0):
            raise ValueError(f"camera view {k} at {eye} lies outside the room (half extent {half})")


def _shade(
    albedo: Tensor,
    normals: Tensor,
    view_dirs: Tensor,
    spec_w: Tensor,
    shininess: Tensor,
    points: Tensor,
    prims: list[PlacedPrimitive],
    lights: tuple[Light, ...],
    ambient: Tensor,
) -> Tensor:
    """Radiance (M, 3) of surface points (M, 3) with unit normals facing the viewer.

    view_dirs: unit vectors (M, 3) from the point towards the camera. Only primitives cast shadows;
    the room receives them but never blocks a light."""
    color = ambient * albedo
    origin = points + _SHADOW_OFFSET * normals
    for light in lights:
        vec = torch.tensor(light.vector)
        if light.kind == "directional":
            to_light = vec.expand_as(points)
            falloff = torch.ones(points.shape[0])
            t_max = torch.full((points.shape[0],), float("inf"))
        else:
            to_light = vec - points
            dist2 = dot(to_light, to_light).clamp_min(1e-8)
            falloff = 1.0 / dist2
            to_light = to_light / dist2.sqrt()[:, None]
            t_max = dist2.sqrt()
        cos = dot(normals, to_light).clamp_min(0.0)
        lit = cos > 0
        for prim in prims:  # shadow rays only where the surface faces the light
            idx = torch.nonzero(lit).squeeze(1)
            if idx.numel() == 0:
                break
            hit = intersect(prim, origin[idx], to_light[idx]) < t_max[idx]
            lit[idx[hit]] = False
        half_vec = torch.nn.functional.normalize(to_light + view_dirs, dim=1)
        spec = spec_w * pow_(dot(normals, half_vec).clamp_min(0.0), shininess)
        radiance = torch.tensor(light.color) * light.intensity * (falloff * lit)[:, None]
        color = color + radiance * (albedo * cos[:, None] + spec[:, None])
    return color


def _surface(material: Material, tex_points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m = tex_points.shape[0]
    albedo = evaluate_texture(material.texture, tex_points)
    return albedo, torch.full((m,), material.specular), torch.full((m,), material.shininess)


def _nearest_surface(
    prims: list[PlacedPrimitive], spec: SceneSpec, origins: Tensor, dirs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per ray: distance t, surface id (-2 background, -1 room, i >= 0 primitive i), room face id."""
    geo = spec.geometry
    t, room_id = intersect_room(origins, dirs, geo.room_half_extent, geo.wall_height)
    surface = torch.where(room_id >= 0, -1, -2)
    for i, prim in enumerate(prims):
        t_i = intersect(prim, origins, dirs)
        closer = t_i < t
        t = torch.where(closer, t_i, t)
        surface = torch.where(closer, i, surface)
    return t, surface, room_id


def _surface_properties(
    spec: SceneSpec, prims: list[PlacedPrimitive], points: Tensor, surf: Tensor, rid: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normals, albedo, specular weight and shininess at hit points on surfaces `surf`."""
    look = spec.texture
    normals = torch.zeros_like(points)
    albedo, spec_w, shin = (
        torch.zeros_like(points),
        torch.zeros(len(points)),
        torch.ones(len(points)),
    )

    def fill(sel: Tensor, n_sel: Tensor, material: Material, tex_points: Tensor) -> None:
        normals[sel] = n_sel
        albedo[sel], spec_w[sel], shin[sel] = _surface(material, tex_points)

    for i, prim in enumerate(prims):
        sel = torch.nonzero(surf == i).squeeze(1)
        if sel.numel():
            mat = look.objects[i % len(look.objects)]
            fill(sel, world_normals(prim, points[sel]), mat, prim.object_coords(points[sel]))
    # Room: texture coordinates in each surface's own plane, so a flat wall sees a 2D pattern.
    zero = torch.zeros(len(points))
    for sid, plane, mat in (
        (0, (0, 1), look.floor),
        (1, (1, 2), look.walls),
        (2, (0, 2), look.walls),
    ):
        sel = torch.nonzero((surf == -1) & (rid == sid)).squeeze(1)
        if sel.numel():
            p = points[sel]
            axis = 2 if sid == 0 else sid - 1
            n_sel = torch.zeros_like(p)
            n_sel[:, axis] = 1.0 if sid == 0 else -torch.sign(p[:, axis])
            tex = torch.stack([p[:, plane[0]], p[:, plane[1]], zero[sel]], 1)
            fill(sel, n_sel, mat, tex)
    return normals, albedo, spec_w, shin


def _render_rays(spec: SceneSpec, origins: Tensor, dirs: Tensor) -> dict[str, Tensor]:
    """Flat rays (N, 3) -> rgb (N, 3), depth (N,), points (N, 3), normals (N, 3), valid (N,)."""
    n = origins.shape[0]
    prims = [PlacedPrimitive.from_spec(p) for p in spec.geometry.primitives]
    t, surface, room_id = _nearest_surface(prims, spec, origins, dirs)
    valid = surface > -2
    idx = torch.nonzero(valid).squeeze(1)
    points = origins[idx] + t[idx, None] * dirs[idx]
    normals, albedo, spec_w, shin = _surface_properties(
        spec, prims, points, surface[idx], room_id[idx]
    )
    ray_dirs = torch.nn.functional.normalize(dirs[idx], dim=1)
    facing = dot(normals, ray_dirs)[:, None]
    normals = torch.where(facing > 0, -normals, normals)  # face the viewer
    lighting = spec.lighting
    radiance = _shade(
        albedo, normals, -ray_dirs, spec_w, shin, points, prims, lighting.lights,
        torch.tensor(lighting.ambient),
    )  # fmt: skip
    rgb = torch.tensor(lighting.background).repeat(n, 1)
    rgb[idx] = pow_(radiance.clamp(0.0, 1.0), _GAMMA)
    out_points = torch.zeros(n, 3)
    out_points[idx] = points
    out_normals = torch.zeros(n, 3)
    out_normals[idx] = normals
    depth = torch.where(valid, t, torch.zeros_like(t))
    return {
        "rgb": rgb,
        "depth": depth,
        "points": out_points,
        "normals": out_normals,
        "valid": valid,
    }


def render_scene(
    spec: SceneSpec,
    size: int | tuple[int, int],
    max_rays: int = MAX_RAYS,
    threads: int | None = None,
) -> dict[str, Tensor]:
    """Render every view of the scene's camera rig.

    max_rays bounds the rays traced at once (views are split into chunks); threads sets torch's
    intra-op threads while rendering (default DEFAULT_THREADS = 1, see there). The output does not
    depend on either.

    Returns float32 tensors (S views, H x W pixels):
        images (S, 3, H, W) RGB in [0, 1]; depths (S, H, W) z-depth, 0 where invalid;
        world_points (S, H, W, 3) and normals (S, H, W, 3) (unit, facing the camera; 0 where
        invalid); valid (S, H, W) bool (False where a ray sees only the background);
        intrinsics (S, 3, 3); extrinsics (S, 3, 4) OpenCV camera-from-world.
    """
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"render_scene expects a SceneSpec, got {type(spec).__name__}")
    height, width = check_size(size)
    extrinsics = rig_extrinsics(spec.camera)
    intrinsics = rig_intrinsics(spec.camera, height, width)
    _check_eyes(spec, extrinsics)
    views = spec.camera.views
    chunk = max(1, max_rays // (height * width))
    threads = DEFAULT_THREADS if threads is None else threads
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    parts = []
    with _intra_op_threads(threads):
        for start in range(0, views, chunk):
            sl = slice(start, min(views, start + chunk))
            origins, dirs = camera_rays(intrinsics[sl], extrinsics[sl], height, width)
            parts.append(_render_rays(spec, origins, dirs))
        flat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        rgb = flat["rgb"].reshape(views, height, width, 3).permute(0, 3, 1, 2).contiguous()
    return {
        "images": rgb,
        "depths": flat["depth"].reshape(views, height, width),
        "world_points": flat["points"].reshape(views, height, width, 3),
        "normals": flat["normals"].reshape(views, height, width, 3),
        "valid": flat["valid"].reshape(views, height, width),
        "intrinsics": intrinsics.to(torch.float32),
        "extrinsics": extrinsics.to(torch.float32),
    }
