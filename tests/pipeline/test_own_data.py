"""`attrspace finetune --data`: inputs refused before work, a disjoint seeded validation split,
the resolved config in the run folder, and a run killed mid-way that continues exactly."""

from __future__ import annotations

import json

import pytest
import torch

from attrspace.bank.subspace_bank import linear_shapes, random_bank
from attrspace.cli.main import main
from attrspace.data.families import family_specs
from attrspace.data.folder import write_scene
from attrspace.data.render import render_scene
from attrspace.data.storage import write_family
from attrspace.models.vggt import VGGT, adaptation_targets
from attrspace.pipeline import get_preset
from attrspace.pipeline import own_data as own
from attrspace.pipeline.presets import preset_defaults
from attrspace.train import resumable
from attrspace.train.config import load_config, resolve_config
from attrspace.util.files import read_safetensors

MICRO = get_preset("micro")
FAST = ["train.steps=5", "train.save_every=2", "validation.every=2", "train.batch_size=1"]


def write_scenes(root, n: int = 4, views: int = 3, size: int = 28) -> None:
    """n synthetic scenes in the folder format; every other one without depth (camera only)."""
    for i, spec in enumerate(family_specs("photo", 1, n, views, seed=3)[0].scenes):
        r = render_scene(spec, size)
        depth = r["depths"] if i % 2 == 0 else None
        write_scene(
            root / f"scene{i}", r["images"], r["extrinsics"].float(), r["intrinsics"].float(), depth
        )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    write_scenes(root / "data")
    model = VGGT(MICRO.model)
    shapes = linear_shapes(model, adaptation_targets(model, "paper-subspace").subspace)
    random_bank(shapes, 3, scale=2.0, seed=1).save(root / "bank.safetensors")
    return root


def config(*overrides: str):
    return resolve_config(base=preset_defaults(MICRO), overrides=[*FAST, *overrides])


def run(root, out, *overrides: str) -> dict:
    return own.finetune_on_data(
        data=root / "data",
        bank=root / "bank.safetensors",
        out=out,
        config=config(*overrides),
        preset=MICRO,
        progress=False,
    )


def test_split_is_disjoint_seeded_and_whole_scenes():
    names = [f"s{i}" for i in range(10)]
    train, val = own.split_scenes(names, config("validation.fraction=0.3"))
    assert len(val) == 3 and sorted(train + val) == list(range(10))
    assert (train, val) == own.split_scenes(names, config("validation.fraction=0.3"))
    other = own.split_scenes(names, config("validation.fraction=0.3", "train.seed=5"))
    assert other[1] != val  # another seed draws other scenes (fixed seeds: not a coincidence)
    assert own.split_scenes(names, config("validation.fraction=0.0")) == (list(range(10)), [])
    with pytest.raises(own.RunInputError, match="none to train on"):
        own.split_scenes(["only"], config("validation.fraction=0.5"))


def test_interrupted_run_continues_bit_for_bit(inputs, tmp_path, monkeypatch):
    whole = run(inputs, tmp_path / "whole")

    def stop_after_third_step(step: int) -> None:
        if step == 2:  # 3 steps done, the state was saved after step 2: step 3 is redone
            raise KeyboardInterrupt

    monkeypatch.setattr(resumable, "_after_step", stop_after_third_step)
    with pytest.raises(KeyboardInterrupt):
        run(inputs, tmp_path / "cut")
    assert not (tmp_path / "cut" / "adapter").exists()
    saved = json.loads(read_safetensors(tmp_path / "cut" / own.STATE_FILE)[1][resumable.STATE_KEY])
    assert saved["step"] == 2
    monkeypatch.undo()
    resumed = run(inputs, tmp_path / "cut")
    a = read_safetensors(tmp_path / "whole" / own.STATE_FILE)[0]
    b = read_safetensors(tmp_path / "cut" / own.STATE_FILE)[0]
    assert sorted(a) == sorted(b) and any(k.endswith(".M") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("param/") and k.endswith(".M"))
    assert resumed["losses"] == whole["losses"] and len(whole["losses"]) == 5
    assert [v["step"] for v in whole["validation"]] == [2, 4, 5]
    assert resumed["validation"] == whole["validation"]


def test_run_folder_holds_the_resolved_config_and_a_rerun_is_cached(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    first = run(inputs, out, "optim.lr_m=0.004")
    assert load_config(out / "config.toml") == config("optim.lr_m=0.004")
    assert (out / own.ADAPTER_DIR / "adapter_config.json").is_file()
    again = own.finetune_on_data(
        data=inputs / "data",
        bank=inputs / "bank.safetensors",
        out=out,
        config=config("optim.lr_m=0.004"),
        preset=MICRO,
    )
    assert again == first and "nothing to do" in capsys.readouterr().out
    # Another setting is another digest: the existing state is refused, not continued.
    with pytest.raises(resumable.StateFileError, match="another configuration"):
        run(inputs, out, "optim.lr_m=0.005")


def test_groups_get_their_learning_rates(inputs):
    cfg = config("optim.lr_m=0.003", "optim.lr_lora=0.0007")
    checked = own.check_inputs(inputs / "data", inputs / "bank.safetensors", MICRO, None, cfg)
    model = own.prepare_model(checked, cfg, torch.device("cpu"))
    opt = resumable.build_optimizer(model, cfg)
    peaks = {g["name"]: (g["peak"], len(g["params"])) for g in opt.param_groups}
    assert peaks["m"] == (0.003, len(checked.bank.layers))
    assert peaks["lora"][0] == 0.0007 and peaks["lora"][1] > 0 and "full" not in peaks


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bank", "{root}/bank.safetensors", "--data", "{root}/none"], "--data"),
        (["--bank", "{root}/missing.safetensors", "--data", "{root}/data"], "--bank"),
        (["--bank", "{root}/small.safetensors", "--data", "{root}/data"], "does not fit"),
        (["--bank", "{root}/bank.safetensors", "--data", "{root}/data", "--set", "x.y=1"], "valid"),
        (["--data", "{root}/data"], "--data needs --bank"),
        (["--bank", "{root}/bank.safetensors"], "need --data"),
        (
            ["--bank", "{root}/bank.safetensors", "--data", "{root}/data", "--tasks", "photo"],
            "--tasks",
        ),
        (["--bank", "{root}/bank.safetensors", "--data", "{root}/data", "--resume"], "--resume"),
        (
            [
                "--bank",
                "{root}/bank.safetensors",
                "--data",
                "{root}/data",
                "--set",
                "train.batch_size=9",
            ],
            "batch_size",
        ),
    ],
)
def test_bad_input_is_refused_in_one_line_before_work(inputs, tmp_path, capsys, args, message):
    shapes = {"aggregator.frame_blocks.0.attn.qkv": (99, 32)}
    random_bank(shapes, 2).save(inputs / "small.safetensors")
    argv = ["finetune", "--preset", "micro", "--out", str(tmp_path / "o")]
    code = main(argv + [a.format(root=inputs) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()  # nothing was written


def test_settings_reach_the_run(inputs, tmp_path):
    """epochs, frames, bf16, checkpointing, heads = "full" and a rank cap, in one short run."""
    settings = [
        "train.epochs=1.0",
        "train.frames=2",
        "train.precision=bf16",
        "train.gradient_checkpointing=true",
        "adapter.heads=full",
        "adapter.rank_cap=2",
        "validation.fraction=0.25",
    ]
    cfg = config(*settings)
    checked = own.check_inputs(inputs / "data", inputs / "bank.safetensors", MICRO, None, cfg)
    assert {x.rank for x in checked.bank.layers.values()} == {2}
    assert all(checked.train[i]["images"].shape[0] == 2 for i in range(len(checked.train)))
    metrics = run(inputs, tmp_path / "r", *settings)
    assert len(metrics["losses"]) == len(checked.train) == 3  # one epoch of batch 1: 3 scenes
    assert len(metrics["split"]["validation"]) == 1
    state = read_safetensors(tmp_path / "r" / own.STATE_FILE)[0]
    heads = read_safetensors(tmp_path / "r" / "heads.safetensors")[0]
    assert heads and all(f"param/{k}" in state for k in heads)
    ms = [v for k, v in state.items() if k.startswith("param/") and k.endswith(".M")]
    assert ms and all(m.dtype == torch.float32 and m.shape == (2, 2) for m in ms)
    model = own.load_run(tmp_path / "r")
    assert model.aggregator.gradient_checkpointing


def test_scene_shapes_are_checked_from_headers_before_work(inputs, tmp_path):
    write_scenes(tmp_path / "mixed" / "a", n=2, size=28)
    write_scenes(tmp_path / "mixed" / "b", n=2, size=42)
    data = tmp_path / "mixed"
    for folder in sorted(data.glob("*/*")):  # one data root of four scene folders
        folder.rename(data / f"{folder.parent.name}_{folder.name}")
    bank = inputs / "bank.safetensors"
    with pytest.raises(own.RunInputError, match="different shapes"):
        own.check_inputs(data, bank, MICRO, None, config("train.batch_size=2"))
    own.check_inputs(data, bank, MICRO, None, config("train.batch_size=2", "train.image_size=28"))
    own.check_inputs(data, bank, MICRO, None, config())  # batch 1: sizes may differ
    spec = family_specs("photo", 1, 1, 3, seed=3)[0].scenes[0]
    r = render_scene(spec, 28)
    padded = torch.nn.functional.pad(r["images"], (0, 2, 0, 2))  # 30 x 30: no patch grid
    for i in range(2):
        write_scene(
            tmp_path / "odd" / f"s{i}", padded, r["extrinsics"].float(), r["intrinsics"].float()
        )
    with pytest.raises(own.RunInputError, match="not multiples of the patch size 14"):
        own.check_inputs(tmp_path / "odd", bank, MICRO, None, config("validation.fraction=0.0"))


def test_a_rendered_family_is_data_too(inputs, tmp_path):
    write_family(tmp_path / "family", "photo", 1, 3, 3, 28, seed=0)
    cfg = config("train.frames=2", "validation.fraction=0.3")
    checked = own.check_inputs(tmp_path / "family", inputs / "bank.safetensors", MICRO, None, cfg)
    assert len(checked.train) == 2 and len(checked.val) == 1
    sample = checked.train[0]
    assert sample["images"].shape[0] == 2 and sample["world_points"].shape[0] == 2
    with pytest.raises(own.RunInputError, match="image_size"):
        own.check_inputs(
            tmp_path / "family",
            inputs / "bank.safetensors",
            MICRO,
            None,
            config("train.image_size=56"),
        )
