"""The end-to-end pipeline on the micro preset: every stage's outputs, the mined bank, the control
banks, caching, resuming after a kill, recomputing only what a changed configuration touches."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from attrspace import SubspaceBank, inject
from attrspace.bank import BankFileError
from attrspace.cli.main import main
from attrspace.linalg import principal_cosines
from attrspace.models.vggt import load_pretrained
from attrspace.pipeline import StageFileError, Workspace, get_preset, run_pipeline, run_stages
from attrspace.pipeline.cache import MARKER
from attrspace.pipeline.stages import common as stages_module
from attrspace.pipeline.stages import pretrain as pretrain_stage_module
from attrspace.pipeline.stages.evaluate import HEADLINE
from attrspace.pipeline.stages.mining import bank_path

MICRO = get_preset("micro")


def _files(root: Path) -> dict[str, int]:
    """Every file under root with its modification time in ns."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _copy(src: Path, dst: Path, keep: tuple[str, ...]) -> Path:
    """A run folder holding only some stages of `src` (file times preserved)."""
    for name in keep:
        shutil.copytree(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    ws = run_pipeline(MICRO, out, progress=False)
    return out, ws


def test_every_stage_writes_its_outputs(micro_run):
    out, ws = micro_run
    assert all(status == "ran" for _, status in ws.events)
    for family in ("mixed", "texture", "camera", "photo"):
        assert (out / "data" / family / "manifest.json").is_file()
        assert (out / "data" / family / MARKER).is_file()
    assert (out / "base" / "model.safetensors").is_file()
    for attribute in MICRO.attributes:
        folders = sorted((out / "loras" / attribute).iterdir())
        assert len(folders) == MICRO.data.loras_per_attribute
        for folder in folders:
            assert (folder / "adapter_config.json").is_file()
            curve = json.loads((folder / "curve.json").read_text())
            assert len(curve["objective"]) == MICRO.lora.steps
    summary = json.loads((out / "mine" / "summary.json").read_text())
    assert set(summary["attributes"]) == set(MICRO.attributes)
    assert len(summary["K"]) == 16  # 2 frame + 2 global blocks x qkv, proj, fc1, fc2
    assert "texture|camera" in summary["mean_overlaps"]
    assert 0 < summary["random_overlaps"]["texture|camera"]["col"] <= 1
    for method in MICRO.methods:
        record = json.loads((out / "finetune" / "photo" / method / "metrics.json").read_text())
        assert record["status"] == "ok", record
        for key, _, _ in HEADLINE:
            assert math.isfinite(record["test"][key])
        assert record["test"]["scenes"] == MICRO.data.task_test_scenes
        if method == "zero-shot":
            assert record["trainable_params"] == 0
        else:
            assert record["trainable_params"] > 0 and record["step_ms"] > 0
            assert record["saved_activation_bytes"] > 0
    report = (out / "report.md").read_text()
    for method in MICRO.methods:
        assert f"| {method} |" in report
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # an optional dependency: the report says so instead of drawing
        assert "matplotlib is not installed" in report
    else:
        assert (out / "figures" / "spectra.png").is_file()


def test_base_folder_loads_with_its_config(micro_run):
    out, ws = micro_run
    model, report = load_pretrained(out / "base")
    assert report.ok and model.config == MICRO.model
    base = ws.load_base()
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.cpu()), key


def test_trainable_parameters_follow_the_method(micro_run):
    out, _ = micro_run
    records = {
        m: json.loads((out / "finetune" / "photo" / m / "metrics.json").read_text())
        for m in MICRO.methods
    }
    bank = SubspaceBank.load(out / "mine" / "bank.safetensors")
    k2 = sum(layer.rank**2 for layer in bank.layers.values())
    heads = records["subspace"]["trainable_params"] - k2
    # Same head LoRAs on every bank method; K matched per layer, so the same count.
    for method in ("psv", "random", "single"):
        assert records[method]["trainable_params"] == records["subspace"]["trainable_params"]
    assert records["heads"]["trainable_params"] == heads > 0
    assert records["lora"]["trainable_params"] > heads
    assert records["full"]["trainable_params"] > records["lora"]["trainable_params"]


def test_mined_bank_loads_injects_and_matches_its_official_copy(micro_run):
    out, ws = micro_run
    bank = SubspaceBank.load(out / "mine" / "bank.safetensors")
    official = SubspaceBank.load_official(out / "mine" / "bank_official.safetensors")
    assert set(official.layers) == set(bank.layers)
    for name, layer in bank.layers.items():
        assert torch.equal(official.layers[name].U, layer.U)
        assert torch.equal(official.layers[name].V, layer.V)
    model = ws.load_base()
    images = ws.scenes("photo")[0]["images"][None]
    model.eval()
    with torch.no_grad():
        before = model(images)["depth"]
    report = inject(model, bank)
    assert sorted(report.layers) == sorted(bank.layers)
    assert report.trainable_params == bank.trainable_params()
    with torch.no_grad():
        after = model(images)["depth"]
    torch.testing.assert_close(after, before)  # M starts at zero: the base model unchanged


def test_control_banks_have_the_mined_k_and_their_own_bases(micro_run):
    out, ws = micro_run
    bank = SubspaceBank.load(out / "mine" / "bank.safetensors")
    psv = SubspaceBank.load(bank_path(out, "psv"))
    rand = SubspaceBank.load(bank_path(out, "random"))
    single = SubspaceBank.load(bank_path(out, "single"))
    model = ws.load_base()
    for name, layer in bank.layers.items():
        assert psv.layers[name].rank == rand.layers[name].rank == layer.rank
        assert single.layers[name].rank <= layer.rank
        w = model.get_submodule(name).weight.detach().double()
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        k = layer.rank
        assert principal_cosines(psv.layers[name].U.double(), u[:, :k]).min() > 0.999
        assert principal_cosines(psv.layers[name].V.double(), vh[:k].t()).min() > 0.999
    assert single.attributes == (MICRO.single_attribute,)


def test_rerun_takes_everything_from_the_cache(micro_run, tmp_path):
    out, _ = micro_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = _files(copy)
    ws = Workspace(copy, MICRO, progress=False)
    run_stages(ws)
    assert ws.ran() == []
    assert _files(copy) == before


def test_cli_run_on_a_finished_folder_only_rewrites_the_report(micro_run, tmp_path, capsys):
    out, _ = micro_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = _files(copy / "finetune")
    assert main(["run", "--preset", "micro", "--out", str(copy)]) == 0
    assert "0 pieces of work done" in capsys.readouterr().out
    assert _files(copy / "finetune") == before
    runs = json.loads((copy / "runs.json").read_text())["runs"]
    assert len(runs) == 2 and runs[-1]["ran"] == []
    # Subcommands stop after their stage; a mining override redoes the mine stage only.
    assert main(["mine", "--preset", "micro", "--out", str(copy), "--rank", "1", "--quiet"]) == 0
    runs = json.loads((copy / "runs.json").read_text())["runs"]
    assert runs[-1]["command"] == "mine" and runs[-1]["ran"] == ["mine"]
    bank = SubspaceBank.load(copy / "mine" / "bank.safetensors")
    assert {layer.rank for layer in bank.layers.values()} == {2}  # d = 1 per attribute
    # The report shows what the last invocation used: the fine-tuning results were made with the
    # earlier bank, so they are left out.
    assert main(["report", "--out", str(copy)]) == 0
    report = (copy / "report.md").read_text()
    assert "## Mined subspaces" in report and "## Downstream" not in report


def test_resume_after_a_kill_during_the_lora_stage(micro_run, tmp_path, monkeypatch):
    out, _ = micro_run
    run = _copy(out, tmp_path / "run", ("data", "base"))
    real_train = stages_module.train
    calls = []

    def killed_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(stages_module, "train", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(MICRO, run, progress=False, report=False)
    first = run / "loras" / "texture" / "texture_00"
    assert (first / MARKER).is_file()
    assert not (run / "loras" / "texture" / "texture_01" / MARKER).exists()
    kept = _files(first)
    base_files = _files(run / "base")

    monkeypatch.setattr(stages_module, "train", real_train)
    ws = run_pipeline(MICRO, run, progress=False, report=False)
    assert ws.ran("loras") == [
        "loras/texture/texture_01",
        "loras/camera/camera_00",
        "loras/camera/camera_01",
    ]
    assert ws.ran("data") == [] and ws.ran("base") == []
    assert _files(first) == kept and _files(run / "base") == base_files
    # Same seeds and data: the resumed LoRAs equal the uninterrupted run's.
    resumed = (run / "loras" / "camera" / "camera_01" / "adapter_model.safetensors").read_bytes()
    assert (
        resumed
        == (out / "loras" / "camera" / "camera_01" / "adapter_model.safetensors").read_bytes()
    )


def test_a_changed_setting_redoes_only_what_depends_on_it(micro_run, tmp_path):
    out, _ = micro_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    faster = MICRO.replace(finetune=replace(MICRO.finetune, lr=5e-4))
    ws = run_pipeline(faster, run, progress=False, report=False)
    trained = [m for m in MICRO.methods if m not in ("zero-shot", "full")]
    assert sorted(ws.ran()) == sorted(f"finetune/photo/{m}" for m in trained)

    remined = faster.replace(mining=replace(MICRO.mining, rank=1))
    ws = run_pipeline(remined, run, progress=False, report=False)
    banks = ("subspace", "psv", "random", "single")
    assert sorted(ws.ran()) == sorted(["mine", *(f"finetune/photo/{m}" for m in banks)])
    bank = SubspaceBank.load(run / "mine" / "bank.safetensors")
    assert all(set(bank.ranks(n).values()) == {1} for n in bank.layers)


def test_loras_trained_elsewhere_are_mined(micro_run, tmp_path):
    out, _ = micro_run
    run = _copy(out, tmp_path / "run", ("data", "base"))
    ws = Workspace(run, MICRO, loras_dir=out / "loras", progress=False)
    run_stages(ws, until="mine")
    assert ws.ran() == ["mine"]
    ours = SubspaceBank.load(out / "mine" / "bank.safetensors")
    theirs = SubspaceBank.load(run / "mine" / "bank.safetensors")
    for name, layer in ours.layers.items():
        torch.testing.assert_close(theirs.layers[name].U, layer.U)

    (tmp_path / "empty" / "texture").mkdir(parents=True)
    with pytest.raises(ValueError, match="camera"):
        run_stages(Workspace(run, MICRO, loras_dir=tmp_path / "empty", progress=False), "mine")


def test_corrupt_outputs_are_detected_and_redone(micro_run, tmp_path, capsys):
    out, _ = micro_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    bank = run / "mine" / "controls" / "random.safetensors"
    bank.write_bytes(bank.read_bytes()[:-100])
    with pytest.raises(BankFileError):
        SubspaceBank.load(bank)
    ws = run_pipeline(MICRO, run, progress=False, report=False)
    assert f"{bank}: does not match its sha256" in capsys.readouterr().err
    assert ws.ran("mine") == ["mine"] and ws.ran("data") == ws.ran("loras") == []
    redone, original = SubspaceBank.load(bank), SubspaceBank.load(bank_path(out, "random"))
    for name, layer in original.layers.items():
        assert torch.equal(redone.layers[name].U, layer.U)

    other = MICRO.replace(seed=1)
    ws = Workspace(run, other, progress=False)
    with pytest.raises(StageFileError, match="another configuration"):
        ws.load_base(pretrain_stage_module.base_digest(ws))

    (run / "mine" / MARKER).write_text("{not json")
    ws = Workspace(run, MICRO, progress=False)
    run_stages(ws, until="mine")
    assert ws.ran() == ["mine"]  # a malformed marker means: not done


def test_a_checkpoint_replaces_pretraining(micro_run, tmp_path):
    out, _ = micro_run
    no_pretrain = MICRO.replace(pretrain=None)
    run = tmp_path / "run"
    checkpoint = out / "base" / "model.safetensors"
    ws = Workspace(run, no_pretrain, checkpoint=checkpoint, progress=False)
    run_stages(ws, until="train-lora")
    assert not (run / "data" / "mixed").exists()  # nothing to pre-train on
    assert "base" in ws.ran() and not (run / "base" / "model.safetensors").exists()
    assert json.loads((run / "base" / MARKER).read_text())["checkpoint"] == str(checkpoint)
    # The LoRAs start from the checkpoint, which is the micro run's base: the same LoRA results.
    for folder in ("texture/texture_00", "camera/camera_01"):
        ours = (run / "loras" / folder / "adapter_model.safetensors").read_bytes()
        assert ours == (out / "loras" / folder / "adapter_model.safetensors").read_bytes()


def test_preset_validation():
    with pytest.raises(ValueError, match="attributes"):
        MICRO.replace(attributes=("texture", "colour"))
    with pytest.raises(ValueError, match="multiple of the patch"):
        MICRO.replace(data=replace(MICRO.data, image_size=30))
    with pytest.raises(ValueError, match="single_attribute"):
        MICRO.replace(single_attribute="lighting")
    with pytest.raises(ValueError, match="enable_point"):
        MICRO.replace(model=MICRO.model.replace(enable_point=True))
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
    for name in ("micro", "tiny", "small", "vggt1b"):  # every preset builds and follows alpha = 2r
        preset = get_preset(name)
        assert preset.name == name and preset.lora_alpha == 2 * preset.lora_rank
    with pytest.raises(ValueError, match="checkpoint"):
        Workspace(Path("unused"), get_preset("vggt1b"))
