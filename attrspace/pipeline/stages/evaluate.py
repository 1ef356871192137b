"""Evaluation of a model on held-out scenes, as the paper's evaluation does it: depth against the
ground truth (per-scene median scale alignment), cameras by relative pose errors over all frame
pairs, and point clouds unprojected from the predicted depth with the predicted cameras, aligned to
the ground truth by a Sim(3) fit on corresponding pixels.

The training objective can go negative (its confidence term), so errors are reported as
loss_camera + loss_reg_depth, which are plain distances."""

from __future__ import annotations

import math

import torch
from torch import nn

from attrspace.eval.metrics import camera_pose_metrics, depth_metrics, point_cloud_metrics
from attrspace.models.vggt.pose import (
    normalize_scene,
    pose_encoding_to_extrinsics,
    predictions_to_world_points,
)
from attrspace.train.losses import vggt_loss
from attrspace.train.trainer import collate

# The columns every report shows, in order (metrics.json keeps every other value too).
HEADLINE = (
    ("abs_rel", "AbsRel", "lower"),
    ("delta_1", "δ<1.25", "higher"),
    ("auc@30", "AUC@30", "higher"),
    ("rra@15", "RRA@15", "higher"),
    ("rta@15", "RTA@15", "higher"),
    ("accuracy_mean", "Acc", "lower"),
    ("completeness_mean", "Comp", "lower"),
    ("chamfer", "Chamfer", "lower"),
)


def _batch(scene: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in collate([scene]).items()}


@torch.no_grad()
def error_terms(model: nn.Module, scenes: list[dict], device: torch.device) -> dict[str, float]:
    """Mean over scenes (one per batch, eval mode) of loss_camera, loss_reg_depth and their sum
    `error` (distances in the normalised scene frame, never negative); `per_scene` lists the
    error of every scene, for paired comparisons between methods."""
    if not scenes:
        raise ValueError("no scenes to evaluate")
    model.eval()
    camera, depth = [], []
    for scene in scenes:
        batch = _batch(scene, device)
        parts = vggt_loss(model(batch["images"]), batch)
        camera.append(parts["loss_camera"].item())
        depth.append(parts["loss_reg_depth"].item())
    n = len(scenes)
    per_scene = [c + d for c, d in zip(camera, depth, strict=True)]
    return {
        "loss_camera": sum(camera) / n,
        "loss_reg_depth": sum(depth) / n,
        "error": sum(per_scene) / n,
        "per_scene": per_scene,
    }


def _subsample(n: int, limit: int, generator: torch.Generator) -> torch.Tensor:
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:limit]


@torch.no_grad()
def scene_metrics(
    model: nn.Module, scene: dict, device: torch.device, eval_points: int, seed: int
) -> dict[str, float]:
    """Depth, camera and point-cloud metrics of one scene (S views).

    Ground truth is expressed in camera 0's frame at unit mean point distance (the frame VGGT
    predicts in), so point-cloud distances are comparable between scenes. Points: the valid
    pixels, a seeded subsample of at most `eval_points` of them.
    """
    model.eval()
    batch = _batch(scene, device)
    pred = model(batch["images"])
    hw = tuple(batch["images"].shape[-2:])
    masks = batch["point_masks"]
    gt = normalize_scene(batch["extrinsics"], batch["depths"], batch["world_points"], masks)
    out = depth_metrics(pred["depth"][0, ..., 0], gt.depths[0], masks[0], align="median")
    extrinsics, _ = pose_encoding_to_extrinsics(pred["pose_enc"][0], hw)
    out.update(camera_pose_metrics(extrinsics, gt.extrinsics[0]))
    points = predictions_to_world_points(pred, hw)[0][masks[0]]
    gt_points = gt.world_points[0][masks[0]]
    pick = _subsample(points.shape[0], eval_points, torch.Generator().manual_seed(seed))
    out.update(
        point_cloud_metrics(points[pick.to(points.device)], gt_points[pick.to(points.device)])
    )
    return out


def test_metrics(
    model: nn.Module, scenes: list[dict], device: torch.device, eval_points: int, seed: int = 0
) -> dict[str, float]:
    """Every scene_metrics value averaged over the scenes, plus `scenes` (the count)."""
    if not scenes:
        raise ValueError("no scenes to evaluate")
    rows = [scene_metrics(model, s, device, eval_points, seed + i) for i, s in enumerate(scenes)]
    keys = rows[0].keys()
    out = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"metrics {bad} are not finite")
    out["scenes"] = len(rows)
    return out
