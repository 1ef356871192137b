"""3D reconstruction metrics: point clouds (accuracy, completeness, Chamfer, normal consistency after
a Sim(3) alignment, optionally refined by point-to-point ICP), depth (AbsRel, delta < 1.25 after
scale or scale-and-shift alignment) and cameras (RRA, RTA, AUC@30 over all frame pairs).

Nearest neighbours come from scipy's KD-tree (`scipy.spatial.cKDTree`); bench/bench_nn_search.py
measures it against a chunked torch.cdist. ICP and normals are written here rather than taken from
Open3D (the field's library, which the paper uses): its cp311 wheel is 400 MB with a GUI stack,
for two routines of a few lines each whose outputs the tests check against known transforms.
Normals are PCA over k nearest neighbours (Open3D's estimate_normals with a KNN search does the
same); ICP is Open3D's point-to-point variant (rigid, correspondences within a distance threshold).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor


def _points(name: str, x) -> Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2 or t.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (N, 3), got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return t.detach().to(torch.float64).cpu()


def nearest_neighbors(query, reference, k: int = 1) -> tuple[Tensor, Tensor]:
    """For each query point its k nearest reference points.

    query (N, 3), reference (M, 3) -> distances (N,) or (N, k) float64, indices (N,) or (N, k).
    """
    q, r = _points("query", query), _points("reference", reference)
    if not 1 <= k <= r.shape[0]:
        raise ValueError(f"k must be in [1, {r.shape[0]}], got {k}")
    dist, idx = cKDTree(r.numpy()).query(q.numpy(), k=k, workers=-1)
    return torch.from_numpy(np.asarray(dist)), torch.from_numpy(np.asarray(idx, dtype=np.int64))


def umeyama_alignment(src, dst, *, with_scale: bool = True) -> tuple[float, Tensor, Tensor]:
    """Least-squares similarity (scale, R, t) with dst ~ scale * R @ src + t (Umeyama 1991).

    src, dst (N, 3) corresponding points, N >= 3 not all collinear. Returns scale (float), R (3, 3)
    with det +1, t (3,), float64.
    """
    s, d = _points("src", src), _points("dst", dst)
    if s.shape != d.shape:
        raise ValueError(f"src {tuple(s.shape)} and dst {tuple(d.shape)} must correspond")
    if s.shape[0] < 3:
        raise ValueError("umeyama_alignment needs at least 3 point pairs")
    mu_s, mu_d = s.mean(0), d.mean(0)
    sc, dc = s - mu_s, d - mu_d
    cov = dc.T @ sc / s.shape[0]
    u, sigma, vt = torch.linalg.svd(cov)
    fix = torch.ones(3, dtype=torch.float64)
    if torch.det(u) * torch.det(vt) < 0:
        fix[2] = -1.0  # a reflection would fit better; the best rotation flips the last axis
    rot = u @ torch.diag(fix) @ vt
    var_s = (sc * sc).sum() / s.shape[0]
    if var_s == 0:
        raise ValueError("src points are all identical")
    scale = float((sigma * fix).sum() / var_s) if with_scale else 1.0
    t = mu_d - scale * rot @ mu_s
    return scale, rot, t


def apply_similarity(points, scale: float, rot: Tensor, t: Tensor) -> Tensor:
    """(N, 3) -> scale * R @ p + t, float64."""
    p = _points("points", points)
    return scale * p @ rot.T.to(p.dtype) + t.to(p.dtype)


def estimate_normals(points, k: int = 16) -> Tensor:
    """Unit normals (N, 3) by PCA of each point's k nearest neighbours (sign arbitrary)."""
    p = _points("points", points)
    k = min(k, p.shape[0])
    if k < 3:
        raise ValueError("estimate_normals needs at least 3 points")
    _, idx = nearest_neighbors(p, p, k=k)
    nbrs = p[idx]  # (N, k, 3)
    centred = nbrs - nbrs.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    return vecs[..., 0]


def icp_point_to_point(
    src, dst, threshold: float, iterations: int = 30, tolerance: float = 1e-7
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Rigid R, t with dst ~ R @ src + t by point-to-point ICP (Besl-McKay; Open3D's
    registration_icp with TransformationEstimationPointToPoint): each iteration pairs every source
    point with its nearest destination point, keeps pairs closer than `threshold`, and solves the
    rigid fit of those pairs (Umeyama without scale). Stops when the inlier RMSE changes by less
    than `tolerance` or after `iterations`. Returns R (3, 3), t (3,) float64 and the final
    fitness (share of inliers) and inlier RMSE; the identity when too few points are inliers."""
    s, d = _points("src", src), _points("dst", dst)
    if threshold <= 0 or iterations < 1:
        raise ValueError(
            f"threshold must be > 0 and iterations >= 1, got {threshold}, {iterations}"
        )
    tree = cKDTree(d.numpy())
    rot, t = torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    previous = float("inf")
    fitness, rmse = 0.0, 0.0
    for _ in range(iterations):
        moved = s @ rot.T + t
        dist, idx = tree.query(moved.numpy(), k=1, workers=-1)
        inlier = torch.from_numpy(dist < threshold)
        fitness = float(inlier.double().mean())
        if int(inlier.sum()) < 3:
            break
        rmse = float(np.sqrt(np.mean(dist[inlier.numpy()] ** 2)))
        _, step_rot, step_t = umeyama_alignment(
            moved[inlier], d[torch.from_numpy(idx)[inlier]], with_scale=False
        )
        rot, t = step_rot @ rot, step_rot @ t + step_t
        if abs(previous - rmse) < tolerance:
            break
        previous = rmse
    return rot, t, {"fitness": fitness, "inlier_rmse": rmse}


def point_cloud_metrics(
    pred,
    gt,
    *,
    align: bool = True,
    icp_threshold: float | None = None,
    pred_normals=None,
    gt_normals=None,
    normal_k: int = 16,
    threshold: float | None = None,
) -> dict[str, float]:
    """Accuracy (pred -> gt), completeness (gt -> pred), Chamfer = (acc + comp) / 2 and normal
    consistency |n_p . n_NN(p)|, mean and median.

    pred (N, 3), gt (M, 3). align=True first maps pred onto gt with the Umeyama Sim(3) fitted on
    corresponding points (then N must equal M, row i of pred corresponding to row i of gt, e.g.
    the valid pixels of a point map). icp_threshold refines that alignment by point-to-point ICP
    with this correspondence distance (the paper: Umeyama, then ICP at 0.1). Normals default to
    PCA over normal_k neighbours (the given pred_normals are rotated along with the alignment).
    threshold adds precision, recall and F-score at that distance.
    """
    p, g = _points("pred", pred), _points("gt", gt)
    rot = torch.eye(3, dtype=torch.float64)
    if align:
        if p.shape != g.shape:
            raise ValueError("align=True needs corresponding clouds of equal size")
        scale, rot, t = umeyama_alignment(p, g)
        p = apply_similarity(p, scale, rot, t)
    if icp_threshold is not None:
        step_rot, step_t, _ = icp_point_to_point(p, g, icp_threshold)
        p = apply_similarity(p, 1.0, step_rot, step_t)
        rot = step_rot @ rot
    acc, acc_idx = nearest_neighbors(p, g)
    comp, comp_idx = nearest_neighbors(g, p)
    pn = (
        estimate_normals(p, normal_k)
        if pred_normals is None
        else _points("pred_normals", pred_normals) @ rot.T
    )
    gn = estimate_normals(g, normal_k) if gt_normals is None else _points("gt_normals", gt_normals)
    if pn.shape != p.shape or gn.shape != g.shape:
        raise ValueError("normals must have the shape of their point cloud")
    pn = pn / pn.norm(dim=-1, keepdim=True)
    gn = gn / gn.norm(dim=-1, keepdim=True)
    nc_acc = (pn * gn[acc_idx]).sum(-1).abs()
    nc_comp = (gn * pn[comp_idx]).sum(-1).abs()
    out = {
        "accuracy_mean": acc.mean().item(),
        "accuracy_median": acc.median().item(),
        "completeness_mean": comp.mean().item(),
        "completeness_median": comp.median().item(),
        "chamfer": 0.5 * (acc.mean().item() + comp.mean().item()),
        "nc_mean": 0.5 * (nc_acc.mean().item() + nc_comp.mean().item()),
        "nc_median": 0.5 * (nc_acc.median().item() + nc_comp.median().item()),
    }
    if threshold is not None:
        out.update(_f_score(acc, comp, threshold))
    return out


def _f_score(acc: Tensor, comp: Tensor, threshold: float) -> dict[str, float]:
    precision = (acc < threshold).double().mean().item()
    recall = (comp < threshold).double().mean().item()
    fscore = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "fscore": fscore}


def depth_metrics(pred, gt, mask=None, *, align: str | None = "median") -> dict[str, float]:
    """AbsRel, SqRel, RMSE, log-RMSE and delta < 1.25^k (k = 1, 2, 3) over valid pixels.

    pred, gt: depth maps of one shape (any); mask: bool of that shape (default gt > 0); pixels with
    gt <= 0 are never valid. align: "median" (pred * median(gt) / median(pred)), "least_squares"
    (the scale minimising ||s pred - gt||) or None. The scale is one for everything passed in: call
    per frame for per-frame alignment, per sequence for a multi-view consistent one.
    """
    p = torch.as_tensor(pred).detach().double().cpu()
    g = torch.as_tensor(gt).detach().double().cpu()
    if p.shape != g.shape:
        raise ValueError(f"pred {tuple(p.shape)} and gt {tuple(g.shape)} differ in shape")
    valid = g > 0
    if mask is not None:
        m = torch.as_tensor(mask).cpu()
        if m.shape != g.shape or m.dtype != torch.bool:
            raise ValueError(f"mask must be bool of shape {tuple(g.shape)}")
        valid &= m
    if not valid.any():
        raise ValueError("no valid pixel (gt > 0 inside the mask)")
    p, g = p[valid], g[valid]
    if not torch.isfinite(p).all():
        raise ValueError("pred holds NaN or infinite values at valid pixels")
    if align == "median":
        p = p * (g.median() / p.median())
    elif align == "least_squares":
        p = p * ((p * g).sum() / (p * p).sum())
    elif align == "scale_shift":
        design = torch.stack((p, torch.ones_like(p)), dim=1)
        coef = torch.linalg.lstsq(design, g[:, None]).solution[:, 0]
        p = coef[0] * p + coef[1]
        # A shift can push the far tail below zero; those pixels are clamped as the protocol does.
        p = p.clamp(min=1e-3 * float(g.min()))
    elif align is not None:
        raise ValueError(
            f"align must be 'median', 'least_squares', 'scale_shift' or None, got {align!r}"
        )
    if (p <= 0).any():
        raise ValueError("aligned predicted depths must be positive at valid pixels")
    ratio = torch.maximum(p / g, g / p)
    return {
        "abs_rel": ((p - g).abs() / g).mean().item(),
        "sq_rel": ((p - g) ** 2 / g).mean().item(),
        "rmse": ((p - g) ** 2).mean().sqrt().item(),
        "log_rmse": ((p.log() - g.log()) ** 2).mean().sqrt().item(),
        "delta_1": (ratio < 1.25).double().mean().item(),
        "delta_2": (ratio < 1.25**2).double().mean().item(),
        "delta_3": (ratio < 1.25**3).double().mean().item(),
    }


def _homogeneous(extrinsics: Tensor) -> Tensor:
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=extrinsics.dtype).expand(
        *extrinsics.shape[:-2], 1, 4
    )
    return torch.cat((extrinsics, bottom), dim=-2)


def relative_pose_errors(pred_extrinsics, gt_extrinsics) -> tuple[Tensor, Tensor]:
    """Rotation and translation-direction errors in degrees for every frame pair i < j.

    pred_extrinsics, gt_extrinsics (S, 3, 4) camera-from-world. Relative poses T_i T_j^-1 are
    compared: e_R is the angle of R_pred^T R_gt, e_t = min(angle, 180 - angle) between the relative
    translations (scale and sign free; 90 when either is zero). Returns two (S (S - 1) / 2,) tensors.
    """
    p = torch.as_tensor(pred_extrinsics).detach().double().cpu()
    g = torch.as_tensor(gt_extrinsics).detach().double().cpu()
    if p.shape != g.shape or p.ndim != 3 or p.shape[-2:] != (3, 4):
        raise ValueError(
            f"extrinsics must both be (S, 3, 4), got {tuple(p.shape)} and {tuple(g.shape)}"
        )
    if p.shape[0] < 2:
        raise ValueError("relative pose errors need at least 2 frames")
    i, j = torch.triu_indices(p.shape[0], p.shape[0], offset=1)
    rel_p = _homogeneous(p)[i] @ torch.linalg.inv(_homogeneous(p)[j])
    rel_g = _homogeneous(g)[i] @ torch.linalg.inv(_homogeneous(g)[j])
    r = rel_p[:, :3, :3].transpose(1, 2) @ rel_g[:, :3, :3]
    cos_r = ((r.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)
    rot_err = torch.rad2deg(torch.arccos(cos_r))
    tp, tg = rel_p[:, :3, 3], rel_g[:, :3, 3]
    norms = tp.norm(dim=-1) * tg.norm(dim=-1)
    cos_t = torch.where(norms > 0, (tp * tg).sum(-1).abs() / norms.clamp(min=1e-300), 0.0)
    trans_err = torch.rad2deg(torch.arccos(cos_t.clamp(0, 1)))
    return rot_err, trans_err


def pose_auc(rot_err: Tensor, trans_err: Tensor, max_threshold: int = 30) -> float:
    """Area under the accuracy curve of max(e_R, e_t) with 1-degree bins:
    (1 / T) * sum_{k=1..T} fraction of pairs with error < k."""
    err = torch.maximum(rot_err, trans_err)
    ks = torch.arange(1, max_threshold + 1, dtype=err.dtype)
    return (err[None] < ks[:, None]).double().mean().item()


def camera_pose_metrics(
    pred_extrinsics, gt_extrinsics, thresholds=(5, 15, 30), auc_max: int = 30
) -> dict[str, float]:
    """RRA@t and RTA@t (fraction of pairs with rotation / translation error below t degrees) and
    AUC@auc_max over all frame pairs of one scene. Extrinsics (S, 3, 4) camera-from-world."""
    rot_err, trans_err = relative_pose_errors(pred_extrinsics, gt_extrinsics)
    out = {}
    for t in thresholds:
        out[f"rra@{t}"] = (rot_err < t).double().mean().item()
        out[f"rta@{t}"] = (trans_err < t).double().mean().item()
    out[f"auc@{auc_max}"] = pose_auc(rot_err, trans_err, auc_max)
    return out
