"""VGGT's training losses: camera (stage-weighted over the refinement iterations), depth and point
maps (confidence-weighted, plus a gradient or normal term), as the released training code
(facebookresearch/vggt, training/loss.py) computes them. All weights are arguments; the defaults are
the released fine-tuning configuration.

Ground truth must be normalised first (`attrspace.models.vggt.pose.normalize_scene`; `vggt_loss`
does it for you): camera 0 is the world frame, lengths are divided by the mean point distance.

The released code bounds every term at 100 (its `check_and_fix_inf_nan`, `hard_max=100`), and so do
these functions: ground-truth depths and points are clamped to [-100, 100] (normalised units), and
so are the per-element camera errors, the per-pixel residual norms, the confidence terms and the
finite differences of the gradient term. Where this module differs, on purpose:
- non-finite ground truth at a valid pixel raises ValueError instead of being replaced by 0 (it is
  a broken sample, not an outlier); at masked-out pixels it is replaced by 0, as released, so it
  cannot leak into the gradient term through `0 * nan`;
- non-finite loss terms are not replaced by 0: a NaN prediction gives a NaN loss the trainer sees
  (the clamps still map an infinite term to +-100);
- `filter_by_quantile` takes its quantile over all values, never a random subset (the released code
  subsamples 1e6 of them above 1e8 values, far beyond a training batch of this package).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attrspace.geometry import invert_extrinsics
from attrspace.models.vggt.pose import extrinsics_to_pose_encoding, normalize_scene

_HARD_MAX = 100.0


def _bound(t: Tensor) -> Tensor:
    """Clamp to [-100, 100], the released code's `hard_max` on every loss term."""
    return t.clamp(min=-_HARD_MAX, max=_HARD_MAX)


def _zero_like_graph(t: Tensor) -> Tensor:
    """A zero that keeps `t` in the graph (so every parameter still gets a (zero) gradient)."""
    return (t * 0).sum()


def camera_loss(
    pose_enc_list: list[Tensor],
    gt_extrinsics: Tensor,
    gt_intrinsics: Tensor,
    image_hw: tuple[int, int],
    point_masks: Tensor | None = None,
    *,
    gamma: float = 0.6,
    weight_trans: float = 1.0,
    weight_rot: float = 1.0,
    weight_fov: float = 0.5,
    min_valid_pixels: int = 100,
    scale_free: Tensor | None = None,
) -> dict[str, Tensor]:
    """L1 between predicted and ground-truth 9-D encodings, per refinement stage weighted by
    gamma^(stages - 1 - i) (the last stage weighs 1), averaged over stages.

    pose_enc_list: stages x (B, S, 9); gt_extrinsics (B, S, 3, 4); gt_intrinsics (B, S, 3, 3);
    point_masks (B, S, H, W) bool: scenes whose frame 0 has <= min_valid_pixels valid pixels are
    left out. Every absolute error (translation, rotation, field of view) is clamped at 100 per
    element, as released (only the translation's can reach it in practice).
    scale_free (B,) bool: scenes whose ground truth has no scale of its own (cameras without
    depth). They are always included, and their translations are compared up to one scale per
    scene and stage: the ground-truth translations are multiplied by the ratio of the predicted
    to the ground-truth mean translation norm (detached, so it steers the direction and the
    relative lengths of the translations, not the scale the network chose).
    Returns loss_camera = wT * loss_T + wR * loss_R + wFoV * loss_FL, and the three parts.
    """
    if not pose_enc_list:
        raise ValueError("pose_enc_list is empty")
    gt = extrinsics_to_pose_encoding(gt_extrinsics, gt_intrinsics, image_hw)
    if gt.shape != pose_enc_list[-1].shape:
        raise ValueError(
            f"ground truth encodes to {tuple(gt.shape)}, predictions are {tuple(pose_enc_list[-1].shape)}"
        )
    valid = camera_scenes(point_masks, min_valid_pixels, gt.shape[0], gt.device, scale_free)
    n = len(pose_enc_list)
    parts = {"loss_T": 0.0, "loss_R": 0.0, "loss_FL": 0.0}
    for i, pred in enumerate(pose_enc_list):
        w = gamma ** (n - 1 - i)
        if not valid.any():
            for key in parts:
                parts[key] = parts[key] + _zero_like_graph(pred)
            continue
        target = gt.to(pred.dtype)
        if scale_free is not None and scale_free.any():
            target = _align_translation_scale(pred, target, scale_free)
        diff = (pred[valid] - target[valid]).abs()
        diff = _bound(diff)
        parts["loss_T"] = parts["loss_T"] + w * diff[..., :3].mean()
        parts["loss_R"] = parts["loss_R"] + w * diff[..., 3:7].mean()
        parts["loss_FL"] = parts["loss_FL"] + w * diff[..., 7:].mean()
    out = {key: value / n for key, value in parts.items()}
    out["loss_camera"] = (
        weight_trans * out["loss_T"] + weight_rot * out["loss_R"] + weight_fov * out["loss_FL"]
    )
    return out


def camera_scenes(
    point_masks: Tensor | None,
    min_valid_pixels: int,
    batch: int,
    device,
    scale_free: Tensor | None = None,
) -> Tensor:
    """(B,) bool: the scenes the camera loss uses: those whose frame 0 has more than
    min_valid_pixels valid pixels (as released; all when point_masks is None), and every
    scale-free (camera-only) scene."""
    if point_masks is None:
        valid = torch.ones(batch, dtype=torch.bool, device=device)
    else:
        valid = point_masks[:, 0].flatten(1).sum(1) > min_valid_pixels
    if scale_free is not None:
        valid = valid | scale_free.to(valid.device)
    return valid


def _align_translation_scale(pred: Tensor, gt: Tensor, scale_free: Tensor) -> Tensor:
    """gt (B, S, 9) with the translations of `scale_free` scenes rescaled to the mean
    translation norm of `pred` (detached); a scene whose ground truth does not move keeps 0."""
    pred_norm = pred[..., :3].detach().norm(dim=-1).mean(-1)  # (B,)
    gt_norm = gt[..., :3].norm(dim=-1).mean(-1)
    ratio = torch.where(
        gt_norm > 0, pred_norm / gt_norm.clamp(min=1e-12), torch.zeros_like(gt_norm)
    )
    ratio = torch.where(scale_free.to(ratio.device), ratio, torch.ones_like(ratio))
    return torch.cat((gt[..., :3] * ratio[:, None, None], gt[..., 3:]), dim=-1)


def filter_by_quantile(values: Tensor, quantile: float, min_elements: int = 1000) -> Tensor:
    """Clamp at 100 and drop values at or above the `quantile` (nearest rank) when there are more
    than `min_elements`; fewer values are returned unchanged. values: (N,) -> (M,)."""
    if values.numel() <= min_elements or quantile <= 0:
        return values
    values = values.clamp(max=_HARD_MAX)
    k = round(quantile * (values.numel() - 1)) + 1
    threshold = min(torch.kthvalue(values.detach().flatten(), k).values.item(), _HARD_MAX)
    kept = values < threshold
    return values[kept] if kept.sum() > min_elements else values


def gradient_loss(
    pred: Tensor,
    gt: Tensor,
    mask: Tensor,
    conf: Tensor | None = None,
    *,
    gamma: float = 1.0,
    alpha: float = 0.2,
) -> Tensor:
    """L1 of the horizontal and vertical finite differences of the masked residual pred - gt,
    summed and divided by the number of valid values. pred, gt (N, H, W, C); mask (N, H, W);
    conf (N, H, W) optional: weights each difference as gamma * d * c - alpha * log c."""
    m = mask[..., None].expand_as(pred).to(pred.dtype)
    diff = (pred - gt) * m
    grad_x = (diff[:, :, 1:] - diff[:, :, :-1]).abs() * (m[:, :, 1:] * m[:, :, :-1])
    grad_y = (diff[:, 1:] - diff[:, :-1]).abs() * (m[:, 1:] * m[:, :-1])
    grad_x, grad_y = grad_x.clamp(max=_HARD_MAX), grad_y.clamp(max=_HARD_MAX)
    if conf is not None:
        cx = conf[..., None].expand_as(pred)[:, :, 1:]
        cy = conf[..., None].expand_as(pred)[:, 1:]
        grad_x = gamma * grad_x * cx - alpha * torch.log(cx)
        grad_y = gamma * grad_y * cy - alpha * torch.log(cy)
    count = m.sum()
    if count == 0:
        return _zero_like_graph(pred)
    return (grad_x.sum() + grad_y.sum()) / count


def point_map_normals(points: Tensor, mask: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Normals from the cross products of the 4 neighbour pairs (up-left, left-down, down-right,
    right-up) of a point map. points (N, H, W, 3), mask (N, H, W) bool ->
    normals (4, N, H, W, 3) unit, valid (4, N, H, W) bool (the pixel and both neighbours valid)."""
    pts = F.pad(points.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    pm = F.pad(mask, (1, 1, 1, 1))
    center = pts[:, 1:-1, 1:-1]
    up, down = pts[:, :-2, 1:-1] - center, pts[:, 2:, 1:-1] - center
    left, right = pts[:, 1:-1, :-2] - center, pts[:, 1:-1, 2:] - center
    normals = torch.stack(
        (
            torch.cross(up, left, dim=-1),
            torch.cross(left, down, dim=-1),
            torch.cross(down, right, dim=-1),
            torch.cross(right, up, dim=-1),
        )
    )
    c = pm[:, 1:-1, 1:-1]
    m_up, m_down, m_left, m_right = (
        pm[:, :-2, 1:-1],
        pm[:, 2:, 1:-1],
        pm[:, 1:-1, :-2],
        pm[:, 1:-1, 2:],
    )
    valid = torch.stack((m_up & m_left, m_left & m_down, m_down & m_right, m_right & m_up)) & c
    return F.normalize(normals, dim=-1, eps=eps), valid


def normal_loss(
    pred: Tensor,
    gt: Tensor,
    mask: Tensor,
    conf: Tensor | None = None,
    *,
    gamma: float = 1.0,
    alpha: float = 0.2,
    eps: float = 1e-8,
) -> Tensor:
    """Mean of 1 - cos between predicted and ground-truth point-map normals where both are
    valid. pred, gt (N, H, W, 3); mask (N, H, W); conf (N, H, W) optional weighting."""
    pn, pv = point_map_normals(pred, mask, eps)
    gn, gv = point_map_normals(gt, mask, eps)
    valid = pv & gv
    if valid.sum() < 10:
        return _zero_like_graph(pred)
    dot = (pn[valid] * gn[valid]).sum(-1).clamp(-1 + eps, 1 - eps)
    loss = 1 - dot
    if conf is not None:
        c = conf[None].expand(4, -1, -1, -1)[valid]
        loss = gamma * loss * c - alpha * torch.log(c)
    return loss.mean()


def _multi_scale(
    fn, pred: Tensor, gt: Tensor, mask: Tensor, conf: Tensor | None, scales: int
) -> Tensor:
    total = 0.0
    for s in range(scales):
        step = 2**s
        sub_conf = conf[:, ::step, ::step] if conf is not None else None
        total = total + fn(
            pred[:, ::step, ::step], gt[:, ::step, ::step], mask[:, ::step, ::step], sub_conf
        )
    return total / scales


def regression_loss(
    pred: Tensor,
    gt: Tensor,
    mask: Tensor,
    conf: Tensor,
    *,
    gradient: str | None,
    gamma: float = 1.0,
    alpha: float = 0.2,
    valid_range: float = 0.98,
    gradient_conf: bool = False,
) -> dict[str, Tensor]:
    """Confidence-weighted regression of a dense map.

    pred, gt (B, S, H, W, C); mask (B, S, H, W) bool; conf (B, S, H, W) > 1.
    The ground truth is first clamped to [-100, 100] (the released code does this in its
    compute_depth_loss / compute_point_loss, the only callers of its regression_loss).
    e = min(||gt - pred||, 100) per valid pixel; conf term mean(clamp(gamma * e * c - alpha * log c,
    -100, 100)); reg term mean(e) (both filtered by `valid_range`, see filter_by_quantile); gradient
    term "grad" (L1 of residual differences, 4 scales), "normal" (1 - cos of neighbour normals, 3
    scales) or None. Returns {"conf", "reg", "grad"} (scalars).
    """
    if pred.shape != gt.shape or pred.shape[:-1] != mask.shape or conf.shape != mask.shape:
        raise ValueError(
            f"shapes do not fit: pred {tuple(pred.shape)}, gt {tuple(gt.shape)}, "
            f"mask {tuple(mask.shape)}, conf {tuple(conf.shape)}"
        )
    if gradient not in ("grad", "normal", None):
        raise ValueError(f"gradient must be 'grad', 'normal' or None, got {gradient!r}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    finite = torch.isfinite(gt)
    if not finite[mask].all():
        raise ValueError("ground truth holds NaN or infinite values at valid pixels")
    gt = _bound(torch.where(finite, gt, torch.zeros_like(gt)))
    err = _bound((gt[mask] - pred[mask]).norm(dim=-1))
    conf_term = _bound(gamma * err * conf[mask] - alpha * torch.log(conf[mask]))
    b, s, h, w, c = pred.shape
    flat = (pred.reshape(b * s, h, w, c), gt.reshape(b * s, h, w, c), mask.reshape(b * s, h, w))
    grad_conf = conf.reshape(b * s, h, w) if gradient_conf else None
    if gradient == "grad":
        grad_term = _multi_scale(
            lambda *a: gradient_loss(*a, gamma=gamma, alpha=alpha), *flat, grad_conf, 4
        )
    elif gradient == "normal":
        grad_term = _multi_scale(
            lambda *a: normal_loss(*a, gamma=gamma, alpha=alpha), *flat, grad_conf, 3
        )
    else:
        grad_term = _zero_like_graph(pred)
    if err.numel() == 0:
        zero = _zero_like_graph(pred)
        return {"conf": zero, "reg": zero, "grad": grad_term}
    return {
        "conf": filter_by_quantile(conf_term, valid_range).mean(),
        "reg": filter_by_quantile(err, valid_range).mean(),
        "grad": grad_term,
    }


@dataclass(frozen=True)
class LossConfig:
    """Weights and options of `vggt_loss` (defaults: the released fine-tuning configuration, with
    the point loss as its suggested setting)."""

    camera_weight: float = 5.0
    camera_gamma: float = 0.6
    weight_trans: float = 1.0
    weight_rot: float = 1.0
    weight_fov: float = 0.5
    depth_weight: float = 1.0
    depth_gradient: str | None = "grad"
    point_weight: float = 1.0
    point_gradient: str | None = "normal"
    conf_gamma: float = 1.0
    conf_alpha: float = 0.2
    valid_range: float = 0.98
    min_valid_pixels: int = 100


def _relative_to_first(extrinsics: Tensor) -> Tensor:
    """(B, S, 3, 4) camera-from-world -> camera-from-camera-0 (frame 0 becomes the identity)."""
    first_inv = invert_extrinsics(extrinsics[:, :1])
    rot = extrinsics[..., :3, :3] @ first_inv[..., :3, :3]
    t = extrinsics[..., :3, :3] @ first_inv[..., :3, 3:] + extrinsics[..., :3, 3:]
    return torch.cat((rot, t), dim=-1)


def _normalize_ground_truth(batch: dict, normalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> extrinsics, depths, world points in the frame the network predicts in, and the (B,)
    bool of camera-only scenes (no valid pixel). Scenes with depth are normalised as released
    (camera 0's frame, unit mean point distance); camera-only scenes get camera 0's frame, and
    the camera loss compares their translations up to scale."""
    masks = batch["point_masks"]
    extrinsics, depths, points = batch["extrinsics"], batch["depths"], batch["world_points"]
    camera_only = ~masks.flatten(1).any(1)
    if not normalize:
        return extrinsics, depths, points, camera_only
    if not camera_only.any():
        scene = normalize_scene(extrinsics, depths, points, masks)
        return scene.extrinsics, scene.depths, scene.world_points, camera_only
    extrinsics = _relative_to_first(extrinsics)
    depths, points = depths.clone(), points.clone()
    has = ~camera_only
    if has.any():
        scene = normalize_scene(
            batch["extrinsics"][has], batch["depths"][has], batch["world_points"][has], masks[has]
        )
        extrinsics[has], depths[has], points[has] = (
            scene.extrinsics,
            scene.depths,
            scene.world_points,
        )
    return extrinsics, depths, points, camera_only


def scene_terms(
    batch: dict, predictions: dict | None = None, config: LossConfig | None = None
) -> list[tuple[str, ...]]:
    """Which loss terms each scene of `batch` enters in `vggt_loss`, as names from ("camera",
    "camera up to scale", "depth", "point"): a scene without any valid depth pixel trains on the
    camera loss alone, with its translations compared up to scale; a scene whose frame 0 has too
    few valid pixels (LossConfig.min_valid_pixels) has no camera term, as released.
    predictions: the model's outputs, to leave out the heads it does not have (None: all)."""
    cfg = LossConfig() if config is None else config
    masks = batch["point_masks"]
    camera_only = ~masks.flatten(1).any(1)
    has_head = (lambda key: True) if predictions is None else (lambda key: key in predictions)
    camera = camera_scenes(masks, cfg.min_valid_pixels, masks.shape[0], masks.device, camera_only)
    dense = masks.sum() >= cfg.min_valid_pixels
    out = []
    for b in range(masks.shape[0]):
        terms = []
        if has_head("pose_enc_list") and camera[b]:
            terms.append("camera up to scale" if camera_only[b] else "camera")
        for key, name, weight in (
            ("depth", "depth", cfg.depth_weight),
            ("world_points", "point", cfg.point_weight),
        ):
            if has_head(key) and weight != 0 and dense and not camera_only[b]:
                terms.append(name)
        out.append(tuple(terms))
    return out


def _dense_terms(
    predictions: dict, key: str, gt: Tensor, masks: Tensor, gradient, cfg: LossConfig
) -> dict[str, Tensor]:
    """conf, reg and grad of one dense head (zeros in the graph below min_valid_pixels)."""
    if masks.sum() < cfg.min_valid_pixels:
        return dict.fromkeys(("conf", "reg", "grad"), _zero_like_graph(predictions[key]))
    return regression_loss(
        predictions[key],
        gt.to(predictions[key].dtype),
        masks,
        predictions[f"{key}_conf"],
        gradient=gradient,
        gamma=cfg.conf_gamma,
        alpha=cfg.conf_alpha,
        valid_range=cfg.valid_range,
    )


def vggt_loss(
    predictions: dict, batch: dict, config: LossConfig | None = None, *, normalize: bool = True
) -> dict[str, Tensor]:
    """The total training objective of the heads present in `predictions`.

    batch: images (B, S, 3, H, W), depths (B, S, H, W), extrinsics (B, S, 3, 4), intrinsics
    (B, S, 3, 3), world_points (B, S, H, W, 3), point_masks (B, S, H, W) bool. normalize=True
    first expresses the ground truth in camera 0's frame at unit mean point distance.
    Scenes without any valid depth pixel (cameras only) enter the camera loss alone, their
    translations compared up to scale (see camera_loss's scale_free); `scene_terms` lists the
    terms of every scene.
    Returns every part and "objective" = camera_weight * loss_camera + depth_weight * (conf + reg +
    grad of depth) + point_weight * (same for points).
    """
    cfg = LossConfig() if config is None else config
    missing = [
        k
        for k in ("images", "depths", "extrinsics", "intrinsics", "world_points", "point_masks")
        if k not in batch
    ]
    if missing:
        raise ValueError(f"batch lacks {missing}")
    masks = batch["point_masks"]
    extrinsics, depths, points, camera_only = _normalize_ground_truth(batch, normalize)
    image_hw = tuple(batch["images"].shape[-2:])
    out: dict[str, Tensor] = {}
    objective = 0.0
    if "pose_enc_list" in predictions:
        cam = camera_loss(
            predictions["pose_enc_list"],
            extrinsics,
            batch["intrinsics"],
            image_hw,
            masks,
            gamma=cfg.camera_gamma,
            weight_trans=cfg.weight_trans,
            weight_rot=cfg.weight_rot,
            weight_fov=cfg.weight_fov,
            min_valid_pixels=cfg.min_valid_pixels,
            scale_free=camera_only,
        )
        out.update(cam)
        objective = objective + cfg.camera_weight * cam["loss_camera"]
    for key, gt, weight, gradient in (
        ("depth", depths[..., None], cfg.depth_weight, cfg.depth_gradient),
        ("world_points", points, cfg.point_weight, cfg.point_gradient),
    ):
        if key not in predictions:
            continue
        name = "depth" if key == "depth" else "point"
        parts = _dense_terms(predictions, key, gt, masks, gradient, cfg)
        out.update({f"loss_{part}_{name}": value for part, value in parts.items()})
        objective = objective + weight * (parts["conf"] + parts["reg"] + parts["grad"])
    if not out:
        raise ValueError("predictions hold no camera, depth or point output")
    out["objective"] = objective
    return out
