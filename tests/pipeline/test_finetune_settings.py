"""The pipeline's fine-tuning takes its learning rate and steps from --config / --set, and each
trained method leaves its weights: a peft adapter, the trained tensors and its settings."""

from __future__ import annotations

import json

from attrspace.cli.main import main
from attrspace.export.peft_folder import load_peft
from attrspace.pipeline.stages.finetune import ADAPTER_DIR, TRAINED_FILE
from attrspace.train.config import load_config
from attrspace.util.files import read_safetensors


def test_settings_from_the_command_line_and_weights_in_each_method_folder(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--preset", "micro", "--out", str(out), "--quiet", "--tasks", "photo"]
    argv += ["--methods", "zero-shot", "subspace", "lora", "full"]
    assert main([*argv, "--set", "optim.lr_m=0.003", "--set", "train.steps=3"]) == 0
    for method in ("subspace", "lora"):
        folder = out / "finetune" / "photo" / method
        metrics = json.loads((folder / "metrics.json").read_text())
        assert (metrics["lr"], metrics["steps"]) == (0.003, 3)
        config = load_config(folder / "config.toml")
        assert (config.optim.lr_m, config.train.steps) == (0.003, 3)
        trained = read_safetensors(folder / TRAINED_FILE)[0]
        factors = load_peft(folder / ADAPTER_DIR)
        assert trained and factors and len(curve(folder)) == 3
        if method == "subspace":
            assert any(k.endswith(".M") and v.abs().sum() > 0 for k, v in trained.items())
    full = out / "finetune" / "photo" / "full"
    assert not (full / ADAPTER_DIR).exists() and (full / TRAINED_FILE).is_file()
    assert not (out / "finetune" / "photo" / "zero-shot" / TRAINED_FILE).exists()
    # another lr redoes the trained methods and nothing else; a key the pipeline cannot honour
    # is refused in one line
    assert main([*argv, "--set", "optim.lr_m=0.002", "--set", "train.steps=3"]) == 0
    lr = json.loads((out / "finetune" / "photo" / "subspace" / "metrics.json").read_text())["lr"]
    assert lr == 0.002
    capsys.readouterr()
    assert main([*argv, "--set", "validation.fraction=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "validation.fraction" in err


def curve(folder) -> list:
    return json.loads((folder / "curve.json").read_text())["objective"]
