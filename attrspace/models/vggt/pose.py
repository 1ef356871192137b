"""VGGT's 9-D camera encoding, quaternions, and the ground-truth normalisation of a scene.

Encoding `absT_quaR_FoV`: [t_x, t_y, t_z, q_x, q_y, q_z, q_w, fov_h, fov_w] of an OpenCV
camera-from-world extrinsic [R | t] (see `attrspace.geometry`); the quaternion is scalar-last;
fov_h = 2 atan(H / (2 f_y)), fov_w = 2 atan(W / (2 f_x)). Decoding puts the principal point at the
image centre (W / 2, H / 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attrspace.geometry import check_last_dims, invert_extrinsics, unproject_depth


def quaternion_to_matrix(quat: Tensor) -> Tensor:
    """(..., 4) quaternions [x, y, z, w] (need not be unit: divided by |q|^2) -> (..., 3, 3)."""
    check_last_dims("quat", quat, (4,))
    x, y, z, w = quat.unbind(-1)
    two_s = 2.0 / (quat * quat).sum(-1)
    rows = (
        1 - two_s * (y * y + z * z),
        two_s * (x * y - z * w),
        two_s * (x * z + y * w),
        two_s * (x * y + z * w),
        1 - two_s * (x * x + z * z),
        two_s * (y * z - x * w),
        two_s * (x * z - y * w),
        two_s * (y * z + x * w),
        1 - two_s * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(*quat.shape[:-1], 3, 3)


def matrix_to_quaternion(rot: Tensor) -> Tensor:
    """(..., 3, 3) rotation matrices -> (..., 4) unit quaternions [x, y, z, w] with w >= 0.

    Of the four algebraically equivalent formulas, each entry uses the one with the largest
    denominator (the best conditioned), so the result is accurate for every rotation.

    Differentiable everywhere: the only square root in the graph is that of the chosen formula's
    denominator, which is at least 1 for any 3 x 3 matrix (the four squared magnitudes below sum
    to 4), so the identity and half turns have finite gradients. (Taking the square root of all
    four and clamping the small ones gave 0 * inf = NaN at the identity.) At a half turn w = 0 and
    the sign convention w >= 0 makes q jump to -q across it; functions of q that do not depend on
    its sign (q q^T, the rotation matrix) are smooth there.
    """
    check_last_dims("rot", rot, (3, 3))
    m = rot
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # 4 * squared magnitude of each component (w, x, y, z), from the diagonal.
    sq = torch.stack(
        (1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22),
        dim=-1,
    )
    # argmax of 2|w|, 2|x|, 2|y|, 2|z| (of the magnitudes, not their squares, so ties resolve as
    # they always have); an index carries no gradient.
    best = torch.sqrt(sq.clamp(min=0)).argmax(dim=-1)
    m21_12, m02_20, m10_01 = (
        m[..., 2, 1] - m[..., 1, 2],
        m[..., 0, 2] - m[..., 2, 0],
        m[..., 1, 0] - m[..., 0, 1],
    )
    m01_10, m02p20, m12p21 = (
        m[..., 0, 1] + m[..., 1, 0],
        m[..., 0, 2] + m[..., 2, 0],
        m[..., 1, 2] + m[..., 2, 1],
    )
    # Candidate i (in w, x, y, z order) multiplied by 4 * component i.
    cands = torch.stack(
        (
            torch.stack((sq[..., 0], m21_12, m02_20, m10_01), dim=-1),
            torch.stack((m21_12, sq[..., 1], m01_10, m02p20), dim=-1),
            torch.stack((m02_20, m01_10, sq[..., 2], m12p21), dim=-1),
            torch.stack((m10_01, m02p20, m12p21, sq[..., 3]), dim=-1),
        ),
        dim=-2,
    )  # (..., 4 candidates, 4 components wxyz)
    chosen = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    denom = 2.0 * torch.sqrt(torch.gather(sq, -1, best[..., None]))  # 4 |chosen component| >= 2
    wxyz = chosen / denom
    xyzw = torch.cat((wxyz[..., 1:], wxyz[..., :1]), dim=-1)
    xyzw = torch.where(xyzw[..., 3:] < 0, -xyzw, xyzw)
    return xyzw / xyzw.norm(dim=-1, keepdim=True)


def _check_image_hw(image_hw) -> tuple[int, int]:
    if len(image_hw) != 2 or any(int(v) <= 0 for v in image_hw):
        raise ValueError(f"image_hw must be (height, width) with positive entries, got {image_hw}")
    return int(image_hw[0]), int(image_hw[1])


def extrinsics_to_pose_encoding(
    extrinsics: Tensor, intrinsics: Tensor, image_hw: tuple[int, int]
) -> Tensor:
    """extrinsics (..., 3, 4) camera-from-world, intrinsics (..., 3, 3) -> (..., 9)."""
    check_last_dims("extrinsics", extrinsics, (3, 4))
    check_last_dims("intrinsics", intrinsics, (3, 3))
    h, w = _check_image_hw(image_hw)
    quat = matrix_to_quaternion(extrinsics[..., :3, :3])
    fov_h = 2 * torch.atan((h / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((w / 2) / intrinsics[..., 0, 0])
    return torch.cat((extrinsics[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]), dim=-1)


def pose_encoding_to_extrinsics(
    pose_enc: Tensor, image_hw: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """(..., 9) -> extrinsics (..., 3, 4) camera-from-world and intrinsics (..., 3, 3) with the
    principal point at (W / 2, H / 2)."""
    check_last_dims("pose_enc", pose_enc, (9,))
    h, w = _check_image_hw(image_hw)
    rot = quaternion_to_matrix(pose_enc[..., 3:7])
    extrinsics = torch.cat((rot, pose_enc[..., :3, None]), dim=-1)
    fy = (h / 2) / torch.tan(pose_enc[..., 7] / 2)
    fx = (w / 2) / torch.tan(pose_enc[..., 8] / 2)
    intrinsics = torch.zeros(
        *pose_enc.shape[:-1], 3, 3, dtype=pose_enc.dtype, device=pose_enc.device
    )
    intrinsics[..., 0, 0] = fx
    intrinsics[..., 1, 1] = fy
    intrinsics[..., 0, 2] = w / 2
    intrinsics[..., 1, 2] = h / 2
    intrinsics[..., 2, 2] = 1.0
    return extrinsics, intrinsics


def fov_to_focal(fov: float, size: int) -> float:
    """Focal length in pixels of a field of view (radians) across `size` pixels."""
    return (size / 2) / math.tan(fov / 2)


def predictions_to_world_points(predictions: dict, image_hw: tuple[int, int]) -> Tensor:
    """Depth + cameras -> world points (B, S, H, W, 3) in the frame of camera 0.

    Uses predictions["depth"] (B, S, H, W, 1) and predictions["pose_enc"] (B, S, 9). This is the
    route the evaluation takes (more accurate than the point head).
    """
    for key in ("depth", "pose_enc"):
        if key not in predictions:
            raise ValueError(f"predictions lack {key!r} (is the head enabled?)")
    extrinsics, intrinsics = pose_encoding_to_extrinsics(predictions["pose_enc"], image_hw)
    return unproject_depth(predictions["depth"][..., 0], intrinsics, extrinsics)


@dataclass
class NormalizedScene:
    """Ground truth in the canonical frame the network predicts in (shapes as given)."""

    extrinsics: Tensor  # (B, S, 3, 4); frame 0 is the identity
    depths: Tensor  # (B, S, H, W)
    world_points: Tensor  # (B, S, H, W, 3), in camera 0's frame
    scale: Tensor  # (B,), the divisor that was applied


def normalize_scene(
    extrinsics: Tensor, depths: Tensor, world_points: Tensor, masks: Tensor
) -> NormalizedScene:
    """Express a batch of scenes in camera 0's frame and divide lengths by the mean distance of the
    valid points to camera 0 (the normalisation VGGT is trained with; predictions are not
    normalised, the network must output this scale).

    extrinsics (B, S, 3, 4) camera-from-world, depths (B, S, H, W), world_points (B, S, H, W, 3),
    masks (B, S, H, W) bool of valid pixels.
    """
    check_last_dims("extrinsics", extrinsics, (3, 4))
    if extrinsics.ndim != 4:
        raise ValueError(f"extrinsics must be (B, S, 3, 4), got {tuple(extrinsics.shape)}")
    b, s = extrinsics.shape[:2]
    if depths.ndim != 4 or depths.shape[:2] != (b, s):
        raise ValueError(f"depths must be (B={b}, S={s}, H, W), got {tuple(depths.shape)}")
    if world_points.shape != (*depths.shape, 3):
        raise ValueError(
            f"world_points must be {(*depths.shape, 3)}, got {tuple(world_points.shape)}"
        )
    if masks.shape != depths.shape or masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool of shape {tuple(depths.shape)}")
    first = extrinsics[:, :1]  # (B, 1, 3, 4)
    first_inv = invert_extrinsics(first)
    rot = extrinsics[..., :3, :3] @ first_inv[..., :3, :3]
    t = (extrinsics[..., :3, :3] @ first_inv[..., :3, 3:]).squeeze(-1) + extrinsics[..., :3, 3]
    r0 = first[:, :, None, None, :3, :3]  # (B, 1, 1, 1, 3, 3)
    t0 = first[:, :, None, None, :3, 3]
    points = (r0 @ world_points[..., None]).squeeze(-1) + t0
    counts = masks.flatten(1).sum(1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"scenes {empty} have no valid pixel to normalise with")
    dist = points.norm(dim=-1) * masks
    scale = dist.flatten(1).sum(1) / counts
    new_extrinsics = torch.cat((rot, (t / scale[:, None, None])[..., None]), dim=-1)
    return NormalizedScene(
        extrinsics=new_extrinsics,
        depths=depths / scale[:, None, None, None],
        world_points=points / scale[:, None, None, None, None],
        scale=scale,
    )
