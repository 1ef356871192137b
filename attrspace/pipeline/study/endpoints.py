"""The study's secondary endpoints: the paper's metrics, per test scene.

Depth: AbsRel and delta < 1.25 after one scale-and-shift alignment per scene (all its frames, the
video-depth protocol). Point clouds: the points unprojected from the predicted depth with the
predicted cameras, Sim(3)-aligned to the ground truth by Umeyama on corresponding pixels, then
refined by point-to-point ICP at correspondence distance ICP_THRESHOLD (the paper's 0.1; here in
units of the scene's mean point distance to camera 0), then Acc, Comp and NC (normals by PCA over
16 neighbours). Metrics from attrspace.eval.metrics.
"""

from __future__ import annotations

import torch
from torch import nn

from attrspace.eval.metrics import depth_metrics, point_cloud_metrics
from attrspace.models.vggt.pose import normalize_scene, predictions_to_world_points
from attrspace.train.trainer import collate

ICP_THRESHOLD = 0.1
# Names in the records, with the report's titles and which direction is better.
SECONDARY = (
    ("abs_rel", "AbsRel", "lower"),
    ("delta_1", "δ<1.25", "higher"),
    ("accuracy", "Acc", "lower"),
    ("completeness", "Comp", "lower"),
    ("nc", "NC", "higher"),
)


@torch.no_grad()
def scene_endpoints(
    model: nn.Module, scene: dict, device: torch.device, points: int, seed: int
) -> dict[str, float]:
    """The SECONDARY metrics of one scene (at most `points` pixels, a seeded subsample, for the
    point clouds)."""
    model.eval()
    batch = {k: v.to(device) for k, v in collate([scene]).items()}
    pred = model(batch["images"])
    hw = tuple(batch["images"].shape[-2:])
    masks = batch["point_masks"]
    gt = normalize_scene(batch["extrinsics"], batch["depths"], batch["world_points"], masks)
    depth = depth_metrics(pred["depth"][0, ..., 0], gt.depths[0], masks[0], align="scale_shift")
    cloud = predictions_to_world_points(pred, hw)[0][masks[0]].cpu()
    gt_cloud = gt.world_points[0][masks[0]].cpu()
    n = cloud.shape[0]
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n, generator=generator)[:points] if n > points else torch.arange(n)
    pc = point_cloud_metrics(cloud[pick], gt_cloud[pick], icp_threshold=ICP_THRESHOLD)
    return {
        "abs_rel": depth["abs_rel"],
        "delta_1": depth["delta_1"],
        "accuracy": pc["accuracy_mean"],
        "completeness": pc["completeness_mean"],
        "nc": pc["nc_mean"],
    }


def endpoints(
    model: nn.Module, scenes: list[dict], device: torch.device, points: int, seed: int
) -> dict[str, list[float]]:
    """Every SECONDARY metric per scene (lists in scene order)."""
    if not scenes:
        raise ValueError("no scenes to evaluate")
    rows = [scene_endpoints(model, s, device, points, seed + i) for i, s in enumerate(scenes)]
    return {key: [r[key] for r in rows] for key, _, _ in SECONDARY}
