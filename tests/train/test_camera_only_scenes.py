"""Scenes without depth train on the camera loss alone, per scene, with translations compared up
to scale; the terms each scene used are reported."""

from __future__ import annotations

import pytest
import torch

from attrspace.data.families import family_specs
from attrspace.data.folder import SceneFolderDataset, write_scene
from attrspace.data.render import render_scene
from attrspace.data.storage import make_sample
from attrspace.models.vggt import VGGT, VGGTConfig
from attrspace.models.vggt.pose import extrinsics_to_pose_encoding
from attrspace.train.losses import LossConfig, camera_loss, scene_terms, vggt_loss
from attrspace.train.trainer import TrainConfig, collate, train

HW = (28, 42)


def scene(seed: int, depth: bool = True) -> dict:
    r = render_scene(family_specs("geometry", 1, 1, 3, seed=seed)[0].scenes[0], HW)
    depths = r["depths"] if depth else torch.zeros_like(r["depths"])
    return make_sample(
        r["images"], depths, r["extrinsics"].float(), r["intrinsics"].float(), f"s{seed}"
    )


@pytest.fixture(scope="module")
def model() -> VGGT:
    torch.manual_seed(0)
    return VGGT(VGGTConfig.tiny()).train()


def test_camera_only_batch_trains_the_camera_head_alone(model):
    batch = collate([scene(1, depth=False), scene(2, depth=False)])
    model.zero_grad()
    out = vggt_loss(model(batch["images"]), batch)
    for part in ("conf", "reg", "grad"):
        assert out[f"loss_{part}_depth"].item() == 0.0
    torch.testing.assert_close(out["objective"], 5.0 * out["loss_camera"])
    out["objective"].backward()
    assert model.camera_head.embed_pose.weight.grad.abs().sum() > 0
    assert model.depth_head.projects[0].weight.grad.abs().sum() == 0
    assert scene_terms(batch) == [("camera up to scale",), ("camera up to scale",)]


def test_mixed_batch_is_the_per_scene_composition(model):
    with_depth, without = scene(3), scene(4, depth=False)
    mixed = collate([with_depth, without])
    with torch.no_grad():
        pred = model(mixed["images"])
        out = vggt_loss(pred, mixed)
        alone = vggt_loss(_scenes(pred, slice(0, 1)), collate([with_depth]))
        cam_only = vggt_loss(_scenes(pred, slice(1, 2)), collate([without]))
    for key in ("loss_conf_depth", "loss_reg_depth", "loss_grad_depth", "loss_reg_point"):
        torch.testing.assert_close(out[key], alone[key])
    # the camera loss averages over the scenes it uses, each the same number of elements
    torch.testing.assert_close(
        out["loss_camera"], (alone["loss_camera"] + cam_only["loss_camera"]) / 2
    )
    assert scene_terms(mixed, pred) == [("camera", "depth", "point"), ("camera up to scale",)]
    no_depth_weight = LossConfig(depth_weight=0.0)
    assert scene_terms(mixed, pred, no_depth_weight)[0] == ("camera", "point")
    del pred["world_points"]
    assert scene_terms(mixed, pred)[0] == ("camera", "depth")


def _scenes(pred: dict, rows: slice) -> dict:
    """The predictions of some scenes of a batch."""
    out = {k: v[rows] for k, v in pred.items() if isinstance(v, torch.Tensor)}
    return {**out, "pose_enc_list": [p[rows] for p in pred["pose_enc_list"]]}


def test_scale_free_translation_ignores_scale_only():
    ext = torch.eye(3, 4).expand(1, 3, 3, 4).clone()
    ext[0, 1, :, 3] = torch.tensor([1.0, 0.0, 0.5])
    ext[0, 2, :, 3] = torch.tensor([-0.5, 0.2, 1.0])
    k = torch.tensor([[30.0, 0, 20.5], [0, 30.0, 13.5], [0, 0, 1]]).expand(1, 3, 3, 3)
    gt = extrinsics_to_pose_encoding(ext, k, HW)
    pred = gt.clone()
    pred[..., :3] *= 3.0  # right directions and ratios, another scale
    free = torch.tensor([True])
    assert camera_loss([pred], ext, k, HW, scale_free=free)["loss_T"].item() < 1e-6
    assert camera_loss([pred], ext, k, HW)["loss_T"].item() > 0.1
    moved = pred.clone()
    moved[0, 2, 0] += 0.3  # a wrong direction is still an error
    assert camera_loss([moved], ext, k, HW, scale_free=free)["loss_T"].item() > 0.01


def test_camera_only_loss_does_not_depend_on_the_world_unit(model):
    s = scene(5, depth=False)
    scaled = dict(s)
    scaled["extrinsics"] = s["extrinsics"].clone()
    scaled["extrinsics"][..., 3] *= 7.0
    with torch.no_grad():
        pred = model(s["images"][None])
        a = vggt_loss(pred, collate([s]))["objective"]
        b = vggt_loss(pred, collate([scaled]))["objective"]
    torch.testing.assert_close(a, b)


def test_training_on_a_camera_only_folder(tmp_path, model):
    for seed in (6, 7):
        r = render_scene(family_specs("geometry", 1, 1, 3, seed=seed)[0].scenes[0], HW)
        write_scene(tmp_path / f"s{seed}", r["images"], r["extrinsics"], r["intrinsics"])
    data = SceneFolderDataset(tmp_path)
    log = train(model, data, TrainConfig(steps=3, batch_size=2, lr=1e-4))
    assert log.scene_terms == {"camera up to scale": 6}
    assert all(torch.isfinite(torch.tensor(log.losses)))
