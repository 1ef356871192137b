"""Pieces of the pipeline on their own: stage markers and digests, the evaluation glue against a
model that predicts the ground truth, the layer bench, and the command line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from attrspace.cli.main import main
from attrspace.data import InMemoryMultiViewDataset, make_family
from attrspace.measure.lineup import bench_layer
from attrspace.models.vggt.pose import extrinsics_to_pose_encoding, normalize_scene
from attrspace.pipeline import StageFileError
from attrspace.pipeline.cache import (
    MARKER,
    clear_marker,
    digest,
    is_done,
    read_marker,
    write_marker,
)
from attrspace.pipeline.report.results import paired_difference
from attrspace.pipeline.stages.evaluate import error_terms, scene_metrics
from attrspace.train.trainer import TrainConfig


def test_digest_follows_every_field():
    a = TrainConfig(steps=10)
    assert digest("x", a) == digest("x", TrainConfig(steps=10))
    assert digest("x", a) != digest("x", TrainConfig(steps=11))
    assert digest("x", a) != digest("y", a)
    assert digest("x", (1, 2)) != digest("x", (2, 1))
    with pytest.raises(TypeError, match="cannot hash"):
        digest(object())


def test_marker_round_trip_and_malformed_markers(tmp_path):
    d = digest("stage", 1)
    assert read_marker(tmp_path) is None and not is_done(tmp_path, d)
    write_marker(tmp_path, "stage", d, 1.5, extra=3)
    marker = read_marker(tmp_path)
    assert marker["digest"] == d and marker["seconds"] == 1.5 and marker["extra"] == 3
    assert is_done(tmp_path, d) and not is_done(tmp_path, digest("stage", 2))
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away
    (tmp_path / MARKER).write_text(
        json.dumps({"stage": "s", "digest": "abc", "seconds": 1, "finished": ""})
    )
    with pytest.raises(StageFileError, match="sha256"):
        read_marker(tmp_path)
    assert not is_done(tmp_path, d)
    (tmp_path / MARKER).write_text("[1, 2]")
    with pytest.raises(StageFileError, match="JSON object"):
        read_marker(tmp_path)
    clear_marker(tmp_path)
    assert read_marker(tmp_path) is None


class GroundTruthModel(nn.Module):
    """Predicts one scene's normalised ground truth: its depths and its camera encodings."""

    def __init__(self, scene: dict) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        b = {k: scene[k][None] for k in ("extrinsics", "depths", "world_points", "point_masks")}
        gt = normalize_scene(b["extrinsics"], b["depths"], b["world_points"], b["point_masks"])
        hw = tuple(scene["images"].shape[-2:])
        self.depth = gt.depths[..., None]
        self.pose = extrinsics_to_pose_encoding(gt.extrinsics, scene["intrinsics"][None], hw)

    def forward(self, images):
        conf = torch.ones_like(self.depth[..., 0]) + 1.0
        return {
            "depth": self.depth + 0 * self.anchor,
            "depth_conf": conf,
            "pose_enc": self.pose,
            "pose_enc_list": [self.pose],
        }


def test_a_perfect_prediction_scores_perfectly():
    scene = InMemoryMultiViewDataset(make_family("photo", 1, 1, 3, 42, seed=3))[0]
    model = GroundTruthModel(scene)
    m = scene_metrics(model, scene, torch.device("cpu"), eval_points=500, seed=0)
    assert m["abs_rel"] < 1e-5 and m["delta_1"] == 1.0
    assert m["auc@30"] > 0.99 and m["rra@15"] == 1.0 and m["rta@15"] == 1.0
    # Not 0: the pose encoding puts the principal point at (W/2, H/2), the renderer at pixel
    # centres ((W-1)/2, (H-1)/2); half a pixel at 42 px leaves a few thousandths after Sim(3).
    assert m["accuracy_mean"] < 1e-2 and m["chamfer"] < 1e-2
    errors = error_terms(model, [scene], torch.device("cpu"))
    assert errors["loss_camera"] < 1e-4 and errors["loss_reg_depth"] < 1e-4
    # A wrong depth scale is forgiven by the median alignment, a wrong depth shape is not.
    model.depth = model.depth * 3.0
    assert scene_metrics(model, scene, torch.device("cpu"), 500, 0)["abs_rel"] < 1e-5
    model.depth = model.depth.flip(-2)
    assert scene_metrics(model, scene, torch.device("cpu"), 500, 0)["abs_rel"] > 1e-2


def test_paired_difference():
    mean, se = paired_difference([1.0, 2.0, 4.0], [0.5, 1.5, 2.5])
    assert mean == pytest.approx((0.5 + 0.5 + 1.5) / 3)
    assert se == pytest.approx(torch.tensor([0.5, 0.5, 1.5]).std().item() / 3**0.5)
    assert paired_difference([1.0], [0.0]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="equal length"):
        paired_difference([1.0], [1.0, 2.0])


def test_layer_bench_rows_and_errors():
    rows = bench_layer(48, 96, 64, rank=8, lora_rank=4, steps=2)
    assert [r.layer for r in rows] == ["frozen nn.Linear", "SubspaceLinear", "LoRALinear"]
    assert [r.trainable for r in rows] == [0, 64, 4 * (48 + 96)]
    # The adapter keeps z = x V (64 x 8 floats); LoRA keeps the input x (64 x 48 floats) and more.
    assert rows[1].saved_bytes == 64 * 8 * 4
    assert rows[2].saved_bytes >= 64 * 48 * 4
    with pytest.raises(ValueError, match="rank"):
        bench_layer(48, 96, 64, rank=60, lora_rank=4)


def test_cli_render_is_wired(tmp_path):
    args = ["render", "--attribute", "texture", "--datasets", "1", "--scenes", "1"]
    args += ["--views", "2", "--size", "28", "--out", str(tmp_path), "--no-contact-sheet"]
    assert main(args) == 0
    assert (tmp_path / "manifest.json").is_file()


def test_cli_bench_and_errors(capsys, tmp_path):
    assert (
        main(
            [
                "bench",
                "--d-in",
                "32",
                "--d-out",
                "64",
                "--tokens",
                "16",
                "--rank",
                "4",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "SubspaceLinear" in out and "LoRALinear" in out
    assert main(["run", "--preset", "vggt1b", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err  # the first problem: no CUDA device here, else no checkpoint
    assert ("--checkpoint" in err) != ("no CUDA device" in err)
    assert main(["run", "--preset", "nope", "--out", str(tmp_path)]) == 2  # argparse's status
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path)]) == 2  # a folder that holds no run
    assert "not a run folder" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_stage_digests_follow_the_seed_and_the_task_split(tmp_path, monkeypatch):
    """The random control bank derives from the preset's seed, and the task's train/test split shapes
    every fine-tuning result: both must change the digests, or a cache of other settings is reused."""
    from attrspace.pipeline.presets import get_preset
    from attrspace.pipeline.stages import finetune, mining
    from attrspace.pipeline.workspace import Workspace

    monkeypatch.setattr(mining, "lora_files_digest", lambda folders: ["same LoRAs"])
    monkeypatch.setattr(finetune, "data_digest", lambda ws, task: "same data")
    micro = get_preset("micro")
    sizes = micro.data
    variants = {
        "micro": micro,
        "seed": micro.replace(seed=micro.seed + 1),
        "split": micro.replace(
            data=dataclasses.replace(sizes, task_train_scenes=sizes.task_train_scenes + 1)
        ),
    }
    mine, lora, zero = {}, {}, {}
    for name, preset in variants.items():
        ws = Workspace(tmp_path / name, preset, progress=False)
        mine[name] = mining.mine_digest(ws, "base", {})
        lora[name] = finetune.method_digest(ws, "base", "mine", "photo", "lora")
        zero[name] = finetune.method_digest(ws, "base", "mine", "photo", "zero-shot")
    assert mine["seed"] != mine["micro"]
    assert mine["split"] == mine["micro"]  # mining does not see the downstream task
    assert lora["split"] != lora["micro"] and zero["split"] != zero["micro"]
