"""Training losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from attrspace.models.vggt.pose import extrinsics_to_pose_encoding
from attrspace.train.losses import (
    LossConfig,
    camera_loss,
    filter_by_quantile,
    gradient_loss,
    normal_loss,
    regression_loss,
    vggt_loss,
)


def _cameras(b: int = 2, s: int = 3):
    ext = torch.eye(3, 4).expand(b, s, 3, 4).clone()
    ext[..., 3] = torch.arange(b * s * 3, dtype=torch.float32).reshape(b, s, 3) / 10
    k = torch.tensor([[20.0, 0, 14], [0, 25.0, 14], [0, 0, 1]]).expand(b, s, 3, 3)
    return ext, k


def test_camera_loss_weights_stages_and_parts():
    ext, k = _cameras()
    gt = extrinsics_to_pose_encoding(ext, k, (28, 28))
    offset = torch.tensor([0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2])
    stages = [gt + 2 * offset, gt - offset]  # stage 0 error 2x, stage 1 error 1x
    out = camera_loss(stages, ext, k, (28, 28), gamma=0.5)
    # per part: (0.5 * 2e + 1 * e) / 2 = e
    torch.testing.assert_close(out["loss_T"], torch.tensor(0.3))
    torch.testing.assert_close(out["loss_R"], torch.tensor(0.1))
    torch.testing.assert_close(out["loss_FL"], torch.tensor(0.2))
    torch.testing.assert_close(out["loss_camera"], torch.tensor(0.3 + 0.1 + 0.5 * 0.2))


def test_camera_loss_skips_scenes_with_few_valid_pixels():
    ext, k = _cameras()
    gt = extrinsics_to_pose_encoding(ext, k, (28, 28))
    pred = gt.clone().requires_grad_()
    with torch.no_grad():
        pred[1] += 1.0  # scene 1 is wrong, but its frame 0 has no valid pixel
    masks = torch.ones(2, 3, 28, 28, dtype=torch.bool)
    masks[1, 0] = False
    out = camera_loss([pred], ext, k, (28, 28), masks)
    assert out["loss_camera"].item() == 0.0
    masks[0, 0] = False
    out = camera_loss([pred], ext, k, (28, 28), masks)
    out["loss_camera"].backward()  # no valid scene: a zero that keeps the graph
    assert out["loss_camera"].item() == 0.0 and pred.grad is not None


def test_regression_loss_hand_computed_without_filtering():
    gt = torch.rand(1, 2, 4, 5, 3, generator=torch.Generator().manual_seed(0))
    delta = torch.tensor([0.3, 0.0, 0.4])  # |delta| = 0.5
    pred = gt + delta
    mask = torch.ones(1, 2, 4, 5, dtype=torch.bool)
    mask[0, 1, 0] = False
    conf = torch.full((1, 2, 4, 5), 2.0)
    out = regression_loss(pred, gt, mask, conf, gradient=None, gamma=1.0, alpha=0.2)
    torch.testing.assert_close(out["reg"], torch.tensor(0.5))
    torch.testing.assert_close(out["conf"], torch.tensor(0.5 * 2 - 0.2 * math.log(2)))
    assert out["grad"].item() == 0.0
    # A constant residual has zero finite differences; a ramp has known ones.
    assert regression_loss(pred, gt, mask, conf, gradient="grad")["grad"].item() == pytest.approx(
        0.0, abs=1e-6
    )
    with pytest.raises(ValueError):
        regression_loss(pred, gt, mask, conf, gradient="sobel")
    with pytest.raises(TypeError):
        regression_loss(pred, gt, mask.float(), conf, gradient=None)


def test_gradient_loss_of_a_ramp():
    gt = torch.zeros(1, 3, 4, 1)
    pred = torch.arange(4.0).expand(1, 3, 4)[..., None] * 0.5  # residual rises 0.5 per column
    mask = torch.ones(1, 3, 4, dtype=torch.bool)
    # 3 rows x 3 horizontal differences of 0.5, vertical differences 0, over 12 valid values.
    assert gradient_loss(pred, gt, mask).item() == pytest.approx(3 * 3 * 0.5 / 12)
    mask[0, :, 3] = False  # the last column drops out of both the differences and the count
    assert gradient_loss(pred, gt, mask).item() == pytest.approx(3 * 2 * 0.5 / 9)


def test_normal_loss_compares_plane_orientations():
    v, u = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    flat = torch.stack((u, v, torch.full_like(u, 5.0)), dim=-1)[None]  # normal along z
    tilted = flat.clone()
    tilted[..., 2] = 5.0 + u * math.tan(math.radians(30))  # normal 30 degrees off z
    mask = torch.ones(1, 6, 7, dtype=torch.bool)
    assert normal_loss(2 * flat, flat, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert normal_loss(tilted, flat, mask).item() == pytest.approx(
        1 - math.cos(math.radians(30)), abs=1e-5
    )


def test_filter_by_quantile_drops_the_top():
    values = torch.arange(2000.0) / 1000  # 0 .. 1.999
    kept = filter_by_quantile(values, 0.98)
    # Nearest-rank 98% quantile of 2000 values is the 1960th (1.959); values below it stay.
    assert kept.numel() == 1959 and kept.max().item() == pytest.approx(1.958)
    small = torch.tensor([500.0, 1.0])
    assert torch.equal(filter_by_quantile(small, 0.98), small)  # too few values: untouched
    big = torch.full((1500,), 1.0)
    big[:20] = 1e6
    assert filter_by_quantile(big, 0.5).max().item() == 100.0  # clamped; quantile keeps too few


def test_vggt_loss_on_model_outputs_backpropagates():
    from attrspace.models.vggt import VGGT, VGGTConfig

    torch.manual_seed(0)
    model = VGGT(VGGTConfig.tiny()).train()
    ext, k = _cameras(b=1, s=2)
    depths = torch.rand(1, 2, 28, 28) + 1.0
    from attrspace.geometry import unproject_depth

    batch = {
        "images": torch.rand(1, 2, 3, 28, 28),
        "depths": depths,
        "extrinsics": ext,
        "intrinsics": k,
        "world_points": unproject_depth(depths, k, ext),
        "point_masks": depths > 0,
    }
    out = vggt_loss(model(batch["images"]), batch, LossConfig())
    expected = {"loss_camera", "loss_T", "loss_R", "loss_FL", "objective"}
    expected |= {f"loss_{p}_{n}" for p in ("conf", "reg", "grad") for n in ("depth", "point")}
    assert set(out) == expected
    assert torch.isfinite(out["objective"])
    out["objective"].backward()
    assert model.depth_head.projects[0].weight.grad.abs().sum() > 0
    assert model.camera_head.embed_pose.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="lacks"):
        vggt_loss({}, {"images": batch["images"]})


def _far_pixel_scene(far: float):
    """An 8 x 8 depth map at 1 except the corner pixel (0, 0) at `far`; prediction 1 everywhere."""
    gt = torch.ones(1, 1, 8, 8, 1)
    gt[0, 0, 0, 0, 0] = far
    pred = torch.ones(1, 1, 8, 8, 1, requires_grad=True)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    conf = torch.full((1, 1, 8, 8), 2.0, requires_grad=True)
    return pred, gt, mask, conf


def test_far_ground_truth_is_clamped_at_100_as_released():
    pred, gt, mask, conf = _far_pixel_scene(150.0)
    out = regression_loss(pred, gt, mask, conf, gradient="grad", gamma=1.0, alpha=0.2)
    # The far pixel counts as depth 100: residual 99 (under the residual bound of 100).
    torch.testing.assert_close(out["reg"], torch.tensor(99 / 64))
    # Its confidence term 99 * 2 - 0.2 log 2 is bounded at 100; the others are -0.2 log 2.
    torch.testing.assert_close(out["conf"], torch.tensor((100 - 63 * 0.2 * math.log(2)) / 64))
    # A corner pixel has 2 differences of 99 at scales 1, 2, 4 (64, 16, 4 values); none at 8.
    torch.testing.assert_close(out["grad"], torch.tensor((198 / 64 + 198 / 16 + 198 / 4) / 4))
    # Any depth beyond 100 is the same sample.
    far = regression_loss(*_far_pixel_scene(1e6), gradient="grad", gamma=1.0, alpha=0.2)
    for key in out:
        assert torch.equal(far[key], out[key]), key
    total = out["reg"] + out["conf"] + out["grad"]
    total.backward()
    assert torch.isfinite(pred.grad).all() and torch.isfinite(conf.grad).all()
    assert pred.grad[0, 0, 0, 0, 0] != 0  # residual 99 < 100: the far pixel still trains
    assert conf.grad[0, 0, 0, 0] == 0  # its confidence term sits at the bound


def test_vggt_loss_clamps_normalised_depth_and_points():
    ext, k = _cameras(b=1, s=2)
    depths = torch.ones(1, 2, 12, 12)
    from attrspace.geometry import unproject_depth

    def batch_with(far: float) -> dict:
        d = depths.clone()
        d[0, 1, 5, 6] = far
        points = unproject_depth(depths, k, ext)
        points[0, 1, 5, 6] = torch.tensor([0.5, -0.5, far])  # only z lies beyond 100
        return {
            "images": torch.rand(1, 2, 3, 12, 12, generator=torch.Generator().manual_seed(0)),
            "depths": d,
            "extrinsics": ext,
            "intrinsics": k,
            "world_points": points,
            "point_masks": d > 0,
        }

    g = torch.Generator().manual_seed(1)
    predictions = {
        "depth": (1 + 0.1 * torch.rand(1, 2, 12, 12, 1, generator=g)).requires_grad_(),
        "depth_conf": 1 + torch.rand(1, 2, 12, 12, generator=g),
        "world_points": torch.randn(1, 2, 12, 12, 3, generator=g).requires_grad_(),
        "world_points_conf": 1 + torch.rand(1, 2, 12, 12, generator=g),
    }
    config = LossConfig(min_valid_pixels=10)
    # Without normalisation the far pixel's depth and points lie beyond 100 in both batches.
    near = vggt_loss(predictions, batch_with(150.0), config, normalize=False)
    far = vggt_loss(predictions, batch_with(1e5), config, normalize=False)
    for key in near:
        assert torch.equal(near[key], far[key]), key
    near["objective"].backward()
    assert torch.isfinite(predictions["depth"].grad).all()
    assert torch.isfinite(predictions["world_points"].grad).all()


def test_camera_errors_are_bounded_at_100_per_element():
    ext, k = _cameras(b=1, s=2)
    gt = extrinsics_to_pose_encoding(ext, k, (28, 28))
    pred = gt.clone()
    pred[..., 0] += 500.0  # translation
    pred[..., 3] += 300.0  # rotation
    pred[..., 7] += 200.0  # field of view
    out = camera_loss([pred], ext, k, (28, 28))
    torch.testing.assert_close(out["loss_T"], torch.tensor(100 / 3))
    torch.testing.assert_close(out["loss_R"], torch.tensor(100 / 4))
    torch.testing.assert_close(out["loss_FL"], torch.tensor(100 / 2))


def test_non_finite_ground_truth_raises_at_valid_pixels_and_is_zeroed_elsewhere():
    pred, gt, mask, conf = _far_pixel_scene(1.0)
    gt[0, 0, 3, 3, 0] = float("nan")
    gt[0, 0, 4, 4, 0] = float("inf")
    with pytest.raises(ValueError, match="valid pixels"):
        regression_loss(pred, gt, mask, conf, gradient="grad")
    mask[0, 0, 3, 3] = mask[0, 0, 4, 4] = False
    out = regression_loss(pred, gt, mask, conf, gradient="grad")
    assert all(torch.isfinite(v) for v in out.values())
    # A masked-out pixel contributes nothing, whatever it held.
    gt[0, 0, 3, 3, 0] = gt[0, 0, 4, 4, 0] = 7.0
    clean = regression_loss(pred, gt, mask, conf, gradient="grad")
    for key in out:
        assert torch.equal(out[key], clean[key]), key
