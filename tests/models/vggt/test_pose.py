"""Pose encoding, quaternions, depth unprojection and the ground-truth normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from attrspace.geometry import camera_centers, project_points, unproject_depth
from attrspace.models.vggt.pose import (
    extrinsics_to_pose_encoding,
    matrix_to_quaternion,
    normalize_scene,
    pose_encoding_to_extrinsics,
    predictions_to_world_points,
    quaternion_to_matrix,
)


def _random_rotations(n: int, seed: int = 0) -> torch.Tensor:
    q = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return quaternion_to_matrix(q)


def _look_at(center: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Camera-from-world (3, 4) of a camera at `center` looking at `target` (OpenCV axes)."""
    z = torch.nn.functional.normalize(target - center, dim=0)
    x = torch.nn.functional.normalize(
        torch.linalg.cross(torch.tensor([0.0, -1.0, 0.0], dtype=z.dtype), z), dim=0
    )
    y = torch.linalg.cross(z, x)
    rot = torch.stack((x, y, z))
    return torch.cat((rot, (-rot @ center)[:, None]), dim=1)


def test_rotations_round_trip_through_quaternions():
    rot = _random_rotations(500)
    assert torch.allclose(
        rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(500, 3, 3), atol=1e-12
    )
    q = matrix_to_quaternion(rot)
    assert (q[:, 3] >= 0).all()
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(500, dtype=torch.float64))
    torch.testing.assert_close(quaternion_to_matrix(q), rot, atol=1e-12, rtol=0)


def test_half_turns_and_known_quaternions():
    # Rotations by 180 degrees have w = 0: the formula that divides by w would fail there.
    for axis in torch.eye(3, dtype=torch.float64):
        rot = 2 * torch.outer(axis, axis) - torch.eye(3, dtype=torch.float64)
        q = matrix_to_quaternion(rot)
        torch.testing.assert_close(q[:3].abs(), axis, atol=1e-12, rtol=0)
        torch.testing.assert_close(quaternion_to_matrix(q), rot, atol=1e-12, rtol=0)
    # 90 degrees about z: q = [0, 0, sin 45, cos 45].
    rz = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    s = math.sqrt(0.5)
    torch.testing.assert_close(
        matrix_to_quaternion(rz), torch.tensor([0, 0, s, s], dtype=torch.float64)
    )
    # A non-unit quaternion is the same rotation (the matrix divides by |q|^2).
    q = torch.tensor([0.3, -0.2, 0.5, 0.7], dtype=torch.float64)
    torch.testing.assert_close(quaternion_to_matrix(3 * q), quaternion_to_matrix(q))


def test_pose_encoding_round_trip_and_fov():
    rot = _random_rotations(6, seed=1).reshape(2, 3, 3, 3)
    t = torch.randn(2, 3, 3, dtype=torch.float64)
    extrinsics = torch.cat((rot, t[..., None]), dim=-1)
    h, w = 42, 56
    intrinsics = torch.zeros(2, 3, 3, 3, dtype=torch.float64)
    intrinsics[..., 0, 0] = torch.linspace(20, 80, 6, dtype=torch.float64).reshape(2, 3)
    intrinsics[..., 1, 1] = torch.linspace(30, 70, 6, dtype=torch.float64).reshape(2, 3)
    intrinsics[..., 0, 2], intrinsics[..., 1, 2], intrinsics[..., 2, 2] = w / 2, h / 2, 1
    enc = extrinsics_to_pose_encoding(extrinsics, intrinsics, (h, w))
    assert enc.shape == (2, 3, 9)
    torch.testing.assert_close(enc[..., :3], t)
    torch.testing.assert_close(enc[..., 7], 2 * torch.atan(h / 2 / intrinsics[..., 1, 1]))
    ext2, int2 = pose_encoding_to_extrinsics(enc, (h, w))
    torch.testing.assert_close(ext2, extrinsics, atol=1e-12, rtol=0)
    torch.testing.assert_close(int2, intrinsics, atol=1e-10, rtol=0)
    # f = W / 2 is a 90 degree horizontal field of view; the identity camera encodes q = [0,0,0,1].
    ident = torch.eye(3, 4, dtype=torch.float64)
    k = torch.tensor([[28.0, 0, 28], [0, 21, 21], [0, 0, 1]], dtype=torch.float64)
    enc = extrinsics_to_pose_encoding(ident, k, (42, 56))
    torch.testing.assert_close(
        enc, torch.tensor([0, 0, 0, 0, 0, 0, 1, math.pi / 2, math.pi / 2], dtype=torch.float64)
    )


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        extrinsics_to_pose_encoding(torch.zeros(2, 4, 4), torch.eye(3).expand(2, 3, 3), (14, 14))
    with pytest.raises(ValueError):
        pose_encoding_to_extrinsics(torch.zeros(2, 8), (14, 14))
    with pytest.raises(ValueError):
        pose_encoding_to_extrinsics(torch.zeros(2, 9), (0, 14))
    with pytest.raises(ValueError):
        predictions_to_world_points({"depth": torch.ones(1, 1, 14, 14, 1)}, (14, 14))


def _plane_scene(s: int = 3, h: int = 14, w: int = 28):
    """Cameras on an arc looking at the plane z = 4 (world); depth from ray-plane intersection."""
    centers = [
        torch.tensor([math.sin(a), 0.2 * a, -1.0 + 0.3 * a], dtype=torch.float64)
        for a in torch.linspace(-0.4, 0.4, s).tolist()
    ]
    extrinsics = torch.stack(
        [_look_at(c, torch.tensor([0.1, 0.0, 4.0], dtype=torch.float64)) for c in centers]
    )
    k = torch.tensor([[20.0, 0, w / 2], [0, 20.0, h / 2], [0, 0, 1]], dtype=torch.float64).expand(
        s, 3, 3
    )
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    rays_cam = torch.stack(
        ((u - w / 2) / 20, (v - h / 2) / 20, torch.ones_like(u)), dim=-1
    )  # z = 1
    rays_world = rays_cam @ extrinsics[:, None, :3, :3]  # R^T r, (s, h, w, 3)
    center = camera_centers(extrinsics)
    depth = (4.0 - center[:, None, None, 2]) / rays_world[..., 2]
    return extrinsics, k, depth


def test_unprojected_depth_lies_on_the_plane_and_reprojects():
    extrinsics, k, depth = _plane_scene()
    points = unproject_depth(depth, k, extrinsics)
    torch.testing.assert_close(points[..., 2], torch.full_like(depth, 4.0), atol=1e-12, rtol=0)
    _, z = project_points(points.reshape(3, -1, 3), k, extrinsics)
    torch.testing.assert_close(z, depth.reshape(3, -1), atol=1e-12, rtol=0)
    enc = extrinsics_to_pose_encoding(extrinsics, k, depth.shape[-2:])
    from_preds = predictions_to_world_points(
        {"depth": depth[None, ..., None], "pose_enc": enc[None]}, depth.shape[-2:]
    )
    torch.testing.assert_close(from_preds[0], points, atol=1e-10, rtol=0)


def test_normalize_scene_canonical_frame_and_similarity_invariance():
    extrinsics, k, depth = _plane_scene()
    points = unproject_depth(depth, k, extrinsics)
    masks = torch.ones_like(depth, dtype=torch.bool)
    masks[1, :3] = False
    scene = normalize_scene(extrinsics[None], depth[None], points[None], masks[None])
    torch.testing.assert_close(
        scene.extrinsics[0, 0], torch.eye(3, 4, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        scene.world_points[0].norm(dim=-1)[masks].mean(), torch.tensor(1.0, dtype=torch.float64)
    )
    # Normalised depths and points are still consistent through the normalised cameras.
    again = unproject_depth(scene.depths[0], k, scene.extrinsics[0])
    torch.testing.assert_close(again, scene.world_points[0], atol=1e-10, rtol=0)
    # A similarity transform of the world (cameras follow) changes nothing after normalisation.
    rot = _random_rotations(1, seed=5)[0]
    scale, shift = 2.5, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    moved_points = scale * points @ rot.T + shift
    # Camera coordinates scale by `scale`: x' = R_c R^T (X' - shift) + scale t_c.
    rot_new = extrinsics[..., :3, :3] @ rot.T
    t_new = scale * extrinsics[..., :3, 3:] - rot_new @ shift[:, None]
    moved_ext = torch.cat((rot_new, t_new), dim=-1)
    moved = normalize_scene(moved_ext[None], scale * depth[None], moved_points[None], masks[None])
    torch.testing.assert_close(moved.extrinsics, scene.extrinsics, atol=1e-10, rtol=0)
    torch.testing.assert_close(moved.depths, scene.depths, atol=1e-10, rtol=0)
    torch.testing.assert_close(moved.world_points, scene.world_points, atol=1e-10, rtol=0)
    torch.testing.assert_close(moved.scale, scale * scene.scale)


def test_normalize_scene_refuses_empty_scenes_and_bad_shapes():
    extrinsics, k, depth = _plane_scene(s=2)
    points = unproject_depth(depth, k, extrinsics)
    masks = torch.zeros(2, 2, *depth.shape[-2:], dtype=torch.bool)
    masks[0] = True
    batch = (
        extrinsics.expand(2, -1, -1, -1),
        depth.expand(2, -1, -1, -1),
        points.expand(2, -1, -1, -1, -1),
    )
    with pytest.raises(ValueError, match=r"scenes \[1\]"):
        normalize_scene(*batch, masks)
    with pytest.raises(ValueError):
        normalize_scene(*batch, masks.float())
    with pytest.raises(ValueError):
        normalize_scene(extrinsics, depth, points, masks[0])


def _half_turn(axis) -> torch.Tensor:
    axis = torch.nn.functional.normalize(torch.tensor(axis, dtype=torch.float64), dim=0)
    return 2 * torch.outer(axis, axis) - torch.eye(3, dtype=torch.float64)


def test_quaternions_of_identity_and_half_turns_are_exact():
    eye = torch.eye(3)
    assert torch.equal(matrix_to_quaternion(eye), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    for i, axis in enumerate(torch.eye(3)):
        rot = 2 * torch.outer(axis, axis) - eye
        assert torch.equal(matrix_to_quaternion(rot), torch.cat((axis, torch.zeros(1)))), i


@pytest.mark.parametrize(
    "name", ["identity", "half_x", "half_y", "half_z", "half_oblique", "random"]
)
def test_quaternion_gradients_are_finite_everywhere(name):
    rots = {
        "identity": torch.eye(3, dtype=torch.float64),
        "half_x": _half_turn([1.0, 0.0, 0.0]),
        "half_y": _half_turn([0.0, 1.0, 0.0]),
        "half_z": _half_turn([0.0, 0.0, 1.0]),
        "half_oblique": _half_turn([2.0, -3.0, 6.0]),
        "random": _random_rotations(1, seed=3)[0],
    }
    for dtype in (torch.float32, torch.float64):
        rot = rots[name].to(dtype).requires_grad_(True)
        weights = torch.randn(4, generator=torch.Generator().manual_seed(0), dtype=dtype)
        (matrix_to_quaternion(rot) * weights).sum().backward()
        assert torch.isfinite(rot.grad).all(), dtype
        assert rot.grad.abs().sum() > 0, dtype


def test_quaternion_gradients_match_finite_differences():
    # Where q is smooth (w clearly positive): q itself, over arbitrary 3 x 3 perturbations.
    for rot in (torch.eye(3, dtype=torch.float64), *_random_rotations(3, seed=4)):
        assert torch.autograd.gradcheck(matrix_to_quaternion, (rot.clone().requires_grad_(),))

    # At half turns w = 0 and q flips sign across it (w >= 0 convention): its sign-free
    # function q q^T is smooth there, and must match finite differences.
    def outer(rot):
        q = matrix_to_quaternion(rot)
        return q[..., :, None] * q[..., None, :]

    for axis in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [2.0, -3.0, 6.0]):
        rot = _half_turn(axis).requires_grad_()
        assert torch.autograd.gradcheck(outer, (rot,)), axis


def test_pose_encoding_of_camera_zero_is_differentiable():
    # After normalisation camera 0 is exactly the identity: the encoding must still backpropagate.
    ext = torch.eye(3, 4).expand(2, 3, 4).clone()
    ext[1, :, 3] = torch.tensor([0.5, -0.2, 0.1])
    ext.requires_grad_()
    k = torch.tensor([[20.0, 0, 14], [0, 25.0, 14], [0, 0, 1]]).expand(2, 3, 3)
    extrinsics_to_pose_encoding(ext, k, (28, 28)).square().sum().backward()
    assert torch.isfinite(ext.grad).all()
