"""Camera rigs to OpenCV matrices (conventions of attrspace.geometry: camera-from-world [R | t],
x right, y down, z forward; pixel (u, v) = (column, row) at integer coordinates)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attrspace.data.scene import CameraRig

WORLD_UP = (0.0, 0.0, 1.0)


def rotation_matrix(rotvec: tuple[float, float, float] | Tensor) -> Tensor:
    """Rodrigues: rotation vector (3,) (axis * angle, radians) -> (3, 3) float64 rotation matrix."""
    r = torch.as_tensor(rotvec, dtype=torch.float64)
    angle = torch.linalg.vector_norm(r)
    if float(angle) < 1e-12:
        return torch.eye(3, dtype=torch.float64)
    k = r / angle
    kx = torch.tensor(
        [[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]], dtype=torch.float64
    )
    return (
        torch.eye(3, dtype=torch.float64) + torch.sin(angle) * kx + (1 - torch.cos(angle)) * kx @ kx
    )


def look_at(eye: Tensor, target: Tensor) -> Tensor:
    """eye (3,), target (3,) -> (3, 4) float64 camera-from-world extrinsics, world z up.

    Rows of R are the camera axes in world coordinates: right, down, forward.
    """
    forward = target - eye
    if float(torch.linalg.vector_norm(forward)) < 1e-9:
        raise ValueError("look_at: eye and target coincide")
    forward = forward / torch.linalg.vector_norm(forward)
    up = torch.tensor(WORLD_UP, dtype=eye.dtype)
    right = torch.linalg.cross(forward, up)
    if float(torch.linalg.vector_norm(right)) < 1e-6:
        raise ValueError("look_at: viewing direction is parallel to the world up axis")
    right = right / torch.linalg.vector_norm(right)
    down = torch.linalg.cross(forward, right)
    rot = torch.stack([right, down, forward])
    return torch.cat([rot, (-rot @ eye)[:, None]], dim=1)


def intrinsics_from_fov(fov_deg: float, height: int, width: int) -> Tensor:
    """Horizontal field of view -> (3, 3) float64 intrinsics, square pixels, principal point at the
    image centre ((W - 1) / 2, (H - 1) / 2) since pixel centres sit at integer coordinates."""
    f = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return torch.tensor(
        [[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )


def _direction(azimuth_deg: float, elevation_deg: float) -> Tensor:
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return torch.tensor(
        [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)],
        dtype=torch.float64,
    )


def rig_extrinsics(rig: CameraRig) -> Tensor:
    """(views, 3, 4) float64 camera-from-world matrices of every view of the rig."""
    target = torch.tensor(rig.target, dtype=torch.float64)
    base_eye = target + rig.radius * _direction(rig.azimuth_deg, rig.elevation_deg)
    out = []
    for k in range(rig.views):
        if rig.kind == "orbit":
            frac = k / (rig.views - 1) if rig.views > 1 else 0.0
            az = rig.azimuth_deg + rig.azimuth_span_deg * frac
            out.append(look_at(target + rig.radius * _direction(az, rig.elevation_deg), target))
        elif rig.kind == "forward":
            heading = (target - base_eye) / rig.radius
            eye = base_eye + k * rig.step * heading
            out.append(look_at(eye, eye + heading))
        elif rig.kind == "random":
            az, el, radius, jx, jy, jz = rig.per_view[k]
            aim = target + torch.tensor([jx, jy, jz], dtype=torch.float64)
            out.append(look_at(aim + radius * _direction(az, el), aim))
        else:  # handheld: the base pose, moved and turned by this view's offsets
            dx, dy, dz, rx, ry, rz = rig.per_view[k]
            base = look_at(base_eye, target)
            eye = base_eye + torch.tensor([dx, dy, dz], dtype=torch.float64)
            turn = rotation_matrix(tuple(math.radians(a) for a in (rx, ry, rz)))
            rot = turn @ base[:, :3]
            out.append(torch.cat([rot, (-rot @ eye)[:, None]], dim=1))
    return torch.stack(out)


def rig_intrinsics(rig: CameraRig, height: int, width: int) -> Tensor:
    """(views, 3, 3) float64 intrinsics; every view of a rig shares one field of view."""
    return intrinsics_from_fov(rig.fov_deg, height, width).expand(rig.views, 3, 3).clone()
