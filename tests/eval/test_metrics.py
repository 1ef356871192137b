"""3D metrics against hand-computed cases and known transforms."""

from __future__ import annotations

import math

import pytest
import torch

from attrspace.eval.metrics import (
    apply_similarity,
    camera_pose_metrics,
    depth_metrics,
    estimate_normals,
    icp_point_to_point,
    nearest_neighbors,
    point_cloud_metrics,
    pose_auc,
    relative_pose_errors,
    umeyama_alignment,
)
from attrspace.models.vggt.pose import quaternion_to_matrix


def _rotation(seed: int) -> torch.Tensor:
    q = torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return quaternion_to_matrix(q)


def _axis_angle(axis, degrees: float) -> torch.Tensor:
    a = torch.nn.functional.normalize(torch.tensor(axis, dtype=torch.float64), dim=0)
    half = math.radians(degrees) / 2
    return quaternion_to_matrix(
        torch.cat((a * math.sin(half), torch.tensor([math.cos(half)], dtype=torch.float64)))
    )


def test_nearest_neighbors_match_brute_force():
    g = torch.Generator().manual_seed(0)
    q, r = (
        torch.rand(300, 3, generator=g, dtype=torch.float64),
        torch.rand(200, 3, generator=g, dtype=torch.float64),
    )
    dist, idx = nearest_neighbors(q, r)
    full = torch.cdist(q, r, compute_mode="donot_use_mm_for_euclid_dist")
    torch.testing.assert_close(dist, full.min(1).values)
    assert torch.equal(idx, full.argmin(1))
    dist3, _ = nearest_neighbors(q, r, k=3)
    torch.testing.assert_close(dist3, full.topk(3, largest=False).values)
    with pytest.raises(ValueError):
        nearest_neighbors(q[:, :2], r)
    with pytest.raises(ValueError):
        nearest_neighbors(q, r, k=0)
    with pytest.raises(ValueError):
        nearest_neighbors(torch.full((2, 3), float("nan")), r)


def test_umeyama_recovers_a_known_similarity():
    src = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rot, scale, t = _rotation(2), 0.37, torch.tensor([1.0, -4.0, 2.5], dtype=torch.float64)
    dst = scale * src @ rot.T + t
    s, r, tt = umeyama_alignment(src, dst)
    assert s == pytest.approx(scale, rel=1e-12)
    torch.testing.assert_close(r, rot, atol=1e-12, rtol=0)
    torch.testing.assert_close(tt, t, atol=1e-12, rtol=0)
    torch.testing.assert_close(apply_similarity(src, s, r, tt), dst, atol=1e-12, rtol=0)
    # A mirrored target still gets a proper rotation (det +1), never a reflection.
    _, r_m, _ = umeyama_alignment(src, src * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    assert torch.det(r_m).item() == pytest.approx(1.0)


def test_point_cloud_metrics_hand_computed():
    gt = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float64)
    pred = gt[:3] + torch.tensor([0, 0, 0.1], dtype=torch.float64)  # 3 points, lifted by 0.1
    normals_gt = torch.tensor([[0, 0, 1.0]]).expand(4, 3)
    normals_pred = torch.tensor([[0, 0, -1.0]]).expand(3, 3)  # flipped: orientation is ignored
    out = point_cloud_metrics(
        pred, gt, align=False, pred_normals=normals_pred, gt_normals=normals_gt, threshold=0.5
    )
    assert out["accuracy_mean"] == pytest.approx(0.1)
    assert out["accuracy_median"] == pytest.approx(0.1)
    comp_4th = math.sqrt(1 + 0.1**2)  # gt (1, 1, 0) to its nearest pred, (1, 0, 0.1)
    assert out["completeness_mean"] == pytest.approx((3 * 0.1 + comp_4th) / 4)
    assert out["chamfer"] == pytest.approx(0.5 * (0.1 + (0.3 + comp_4th) / 4))
    assert out["nc_mean"] == pytest.approx(1.0) and out["nc_median"] == pytest.approx(1.0)
    assert out["precision"] == 1.0 and out["recall"] == 0.75
    assert out["fscore"] == pytest.approx(2 * 0.75 / 1.75)


def test_point_cloud_metrics_undo_a_similarity():
    g = torch.Generator().manual_seed(4)
    u, v = torch.rand(2, 2000, generator=g, dtype=torch.float64)
    gt = torch.stack((u, v, 0.3 * torch.sin(3 * u) + 0.2 * v * v), dim=-1)  # a smooth surface
    pred = 1.7 * gt @ _rotation(6).T + torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    aligned = point_cloud_metrics(pred, gt)
    assert aligned["accuracy_mean"] < 1e-9 and aligned["completeness_mean"] < 1e-9
    assert aligned["nc_mean"] > 0.999
    raw = point_cloud_metrics(pred, gt, align=False)
    assert raw["accuracy_mean"] > 0.5
    with pytest.raises(ValueError):
        point_cloud_metrics(pred[:10], gt)


def test_estimate_normals_of_a_tilted_plane():
    g = torch.Generator().manual_seed(5)
    uv = torch.rand(400, 2, generator=g, dtype=torch.float64)
    normal = torch.nn.functional.normalize(
        torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64), dim=0
    )
    basis = torch.linalg.svd(normal[None]).Vh[1:]  # two directions in the plane
    points = uv @ basis
    n = estimate_normals(points, k=8)
    torch.testing.assert_close(
        (n @ normal).abs(), torch.ones(400, dtype=torch.float64), atol=1e-9, rtol=0
    )


def test_depth_metrics_hand_computed():
    gt = torch.tensor([[1.0, 2.0], [4.0, 0.0]])  # the 0 is invalid
    out = depth_metrics(1.3 * gt, gt, align=None)
    assert out["abs_rel"] == pytest.approx(0.3)
    assert out["delta_1"] == 0.0 and out["delta_2"] == 1.0
    assert out["rmse"] == pytest.approx(math.sqrt((0.09 + 0.36 + 1.44) / 3))
    scaled = depth_metrics(5.0 * gt, gt, align="median")
    assert scaled["abs_rel"] == pytest.approx(0.0, abs=1e-12) and scaled["delta_1"] == 1.0
    lsq = depth_metrics(0.2 * gt, gt, align="least_squares")
    assert lsq["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    mask = torch.tensor([[True, False], [True, True]])
    pred = torch.tensor([[1.0, 100.0], [2.0, 7.0]])
    assert depth_metrics(pred, gt, mask, align=None)["abs_rel"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        depth_metrics(gt, gt, align="mean")
    with pytest.raises(ValueError):
        depth_metrics(gt, torch.zeros(2, 2))


def _trajectory(n: int = 5) -> torch.Tensor:
    ext = []
    for i in range(n):
        rot = _axis_angle([0.2, 1.0, 0.1], 8.0 * i)
        center = torch.tensor([math.sin(0.3 * i), 0.1 * i, -2.0 + 0.2 * i], dtype=torch.float64)
        ext.append(torch.cat((rot, (-rot @ center)[:, None]), dim=1))
    return torch.stack(ext)


def test_camera_metrics_are_similarity_invariant_and_see_known_errors():
    gt = _trajectory()
    # Same cameras in another world frame and scale: every relative error is 0.
    rot, scale, shift = _rotation(8), 3.0, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    moved = torch.cat(
        (gt[:, :, :3] @ rot.T, scale * gt[:, :, 3:] - gt[:, :, :3] @ rot.T @ shift[:, None]), dim=-1
    )
    r_err, t_err = relative_pose_errors(moved, gt)
    assert r_err.shape == (10,) and r_err.max() < 1e-5 and t_err.max() < 1e-5
    assert camera_pose_metrics(moved, gt)["auc@30"] == 1.0
    # Turn camera 2 by 12 degrees about its own axis: exactly its 4 pairs show 12 degrees.
    bad = gt.clone()
    bad[2] = _axis_angle([0.0, 0.0, 1.0], 12.0) @ gt[2]
    r_err, _ = relative_pose_errors(bad, gt)
    i, j = torch.triu_indices(5, 5, offset=1)
    involved = (i == 2) | (j == 2)
    torch.testing.assert_close(
        r_err[involved], torch.full((4,), 12.0, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert r_err[~involved].max() < 1e-5
    metrics = camera_pose_metrics(bad, gt, thresholds=(5, 15))
    assert metrics["rra@5"] == pytest.approx(0.6) and metrics["rra@15"] == 1.0


def test_pose_auc_formula():
    r = torch.tensor([0.5, 10.5])
    t = torch.tensor([0.2, 3.0])
    # error 0.5 is below every k = 1..30; 10.5 below k = 11..30 (20 of 30).
    assert pose_auc(r, t, 30) == pytest.approx((30 + 20) / 60)
    assert pose_auc(torch.tensor([45.0]), torch.tensor([0.0]), 30) == 0.0


def test_scale_shift_depth_alignment_undoes_an_affine_map_and_is_least_squares():
    g = torch.Generator().manual_seed(7)
    gt = 1.0 + torch.rand(3, 6, 5, generator=g, dtype=torch.float64)
    exact = depth_metrics(0.5 * gt - 0.2, gt, align="scale_shift")
    assert exact["abs_rel"] == pytest.approx(0.0, abs=1e-12) and exact["delta_1"] == 1.0
    pred = gt + 0.1 * torch.randn(gt.shape, generator=g, dtype=torch.float64)
    got = depth_metrics(2.0 * pred + 1.0, gt, align="scale_shift")
    design = torch.stack((pred.flatten(), torch.ones(pred.numel(), dtype=torch.float64)), 1)
    s, t = torch.linalg.lstsq(design, gt.flatten()[:, None]).solution[:, 0]
    fitted = s * pred + t
    assert got["abs_rel"] == pytest.approx(float(((fitted - gt).abs() / gt).mean()), rel=1e-9)
    # A median scale cannot undo the shift; scale-and-shift can.
    assert depth_metrics(pred + 3.0, gt)["abs_rel"] > 2 * got["abs_rel"]


def test_icp_recovers_a_small_rigid_motion_without_correspondences():
    g = torch.Generator().manual_seed(8)
    dst = torch.rand(600, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5])
    rot = _axis_angle([0.3, 1.0, -0.2], 4.0)
    t = torch.tensor([0.03, -0.02, 0.01], dtype=torch.float64)
    src = ((dst - t) @ rot)[torch.randperm(600, generator=g)]  # dst = R src + t, rows shuffled
    got_rot, got_t, info = icp_point_to_point(src, dst, threshold=0.2, iterations=100)
    assert torch.allclose(got_rot, rot, atol=1e-6) and torch.allclose(got_t, t, atol=1e-6)
    assert info["fitness"] == 1.0 and info["inlier_rmse"] < 1e-6
    plain = point_cloud_metrics(src, dst, align=False)
    refined = point_cloud_metrics(src, dst, align=False, icp_threshold=0.2)
    assert refined["chamfer"] < 1e-6 < plain["chamfer"]
    with pytest.raises(ValueError, match="threshold"):
        icp_point_to_point(src, dst, threshold=0.0)
