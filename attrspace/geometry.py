"""Camera conventions shared by the model, the renderer and the metrics.

Conventions (those of VGGT and OpenCV):
- extrinsics: (..., 3, 4) camera-from-world [R | t]; a world point X maps to camera coordinates R X + t.
- camera frame: x right, y down, z forward; z-depth is the camera-frame z of the surface point.
- intrinsics: (..., 3, 3) [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] in pixels; pixel (u, v) = (column, row)
  sits at integer coordinates, with no half-pixel offset (VGGT's unprojection does the same).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_last_dims(name: str, t: Tensor, dims: tuple[int, ...]) -> None:
    if t.ndim < len(dims) or tuple(t.shape[-len(dims) :]) != dims:
        raise ValueError(
            f"{name} must have shape (..., {', '.join(map(str, dims))}), got {tuple(t.shape)}"
        )


def invert_extrinsics(extrinsics: Tensor) -> Tensor:
    """(..., 3, 4) camera-from-world -> (..., 3, 4) world-from-camera, in closed form (R^T, -R^T t)."""
    check_last_dims("extrinsics", extrinsics, (3, 4))
    rot = extrinsics[..., :3, :3]
    t = extrinsics[..., :3, 3:]
    rot_t = rot.transpose(-1, -2)
    return torch.cat([rot_t, -rot_t @ t], dim=-1)


def camera_centers(extrinsics: Tensor) -> Tensor:
    """(..., 3, 4) camera-from-world -> (..., 3) camera centres in world coordinates."""
    return invert_extrinsics(extrinsics)[..., :3, 3]


def pixel_grid(height: int, width: int, *, device=None, dtype=torch.float32) -> Tensor:
    """(H, W, 2) pixel coordinates (u, v) = (column, row)."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype),
        torch.arange(width, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def depth_to_camera_points(depth: Tensor, intrinsics: Tensor) -> Tensor:
    """depth (..., H, W), intrinsics (..., 3, 3) -> camera-frame points (..., H, W, 3)."""
    check_last_dims("intrinsics", intrinsics, (3, 3))
    h, w = depth.shape[-2:]
    uv = pixel_grid(h, w, device=depth.device, dtype=depth.dtype)
    fx = intrinsics[..., 0, 0, None, None]
    fy = intrinsics[..., 1, 1, None, None]
    cx = intrinsics[..., 0, 2, None, None]
    cy = intrinsics[..., 1, 2, None, None]
    x = (uv[..., 0] - cx) / fx * depth
    y = (uv[..., 1] - cy) / fy * depth
    return torch.stack([x, y, depth], dim=-1)


def unproject_depth(depth: Tensor, intrinsics: Tensor, extrinsics: Tensor) -> Tensor:
    """Depth maps to world points.

    depth (..., H, W), intrinsics (..., 3, 3), extrinsics (..., 3, 4) camera-from-world
    -> world points (..., H, W, 3).
    """
    cam = depth_to_camera_points(depth, intrinsics)
    world_from_cam = invert_extrinsics(extrinsics)
    rot = world_from_cam[..., None, None, :3, :3]
    t = world_from_cam[..., None, None, :3, 3]
    return (rot @ cam[..., None]).squeeze(-1) + t


def project_points(points: Tensor, intrinsics: Tensor, extrinsics: Tensor) -> tuple[Tensor, Tensor]:
    """World points (..., N, 3) -> (pixel coordinates (..., N, 2), camera-frame depth (..., N)).

    intrinsics (..., 3, 3) and extrinsics (..., 3, 4) broadcast against the leading dims of points.
    """
    check_last_dims("points", points, (3,))
    check_last_dims("extrinsics", extrinsics, (3, 4))
    cam = points @ extrinsics[..., :3, :3].transpose(-1, -2) + extrinsics[..., None, :3, 3]
    z = cam[..., 2]
    pix = cam @ intrinsics.transpose(-1, -2)
    uv = pix[..., :2] / z[..., None]
    return uv, z
