"""The fine-tuning config: file + overrides in order, one-line refusals that list every key, a
TOML form that reads back equal, presets' defaults and what the pipeline takes from them."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from attrspace.cli.main import main
from attrspace.pipeline import PRESETS, get_preset
from attrspace.pipeline.presets import PIPELINE_KEYS, apply_finetune_config, preset_defaults
from attrspace.train.config import (
    SECTIONS,
    ConfigError,
    FinetuneConfig,
    config_toml,
    load_config,
    resolve_config,
    save_config,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

EVERY_KEY = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def refusal(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_config(**kwargs)
    return str(info.value)


def test_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[optim]\nlr_m = 2e-3\nschedule = "linear"\n[train]\nsteps = 40\n')
    c = resolve_config(file=path, overrides=["train.steps=7", "loss.depth_gradient=none"])
    assert (c.optim.lr_m, c.optim.schedule, c.train.steps) == (2e-3, "linear", 7)
    assert c.loss.depth_gradient is None and c.optim.lr_lora == FinetuneConfig().optim.lr_lora


def test_yaml_file_reads_like_toml(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr_m: 2.0e-3\ntrain:\n  precision: bf16\n")
    (tmp_path / "c.toml").write_text('[optim]\nlr_m = 2.0e-3\n[train]\nprecision = "bf16"\n')
    assert resolve_config(file=tmp_path / "c.yaml") == resolve_config(file=tmp_path / "c.toml")
    (tmp_path / "bad.yaml").write_text("optim:\n  lr_m: 1e-3\n")  # YAML 1.1: a string
    assert "write 1.0e-3" in refusal(file=tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=1",
        "nosection.x=1",
        "train.steps=abc",
        "train.steps=2.5",
        "train.steps=true",
        "adapter.heads=3",
        "steps=3",
    ],
)
def test_unknown_keys_and_wrong_types_are_one_line_listing_every_key(override):
    message = refusal(overrides=[override])
    assert "\n" not in message and override.split("=")[0] in message
    assert all(key in message for key in EVERY_KEY)


def test_values_out_of_range_name_the_key():
    assert "optim.schedule" in refusal(overrides=["optim.schedule=step"])
    assert "train.frames" in refusal(overrides=["train.frames=1"])
    assert "optim.lr_m" in refusal(overrides=["optim.lr_m=-1"])
    assert "finite" in refusal(overrides=["optim.clip=inf"])


def test_toml_round_trip_and_saved_file(tmp_path):
    c = resolve_config(overrides=["optim.lr_m=3.3e-05", "adapter.heads=none", "train.seed=123"])
    assert resolve_config(base=None, file=None) == FinetuneConfig()
    text = config_toml(c, header="two\nlines")
    parsed = tomllib.loads(text)
    assert set(parsed) == set(SECTIONS) and parsed["optim"]["lr_m"] == 3.3e-05
    save_config(c, tmp_path / "run" / "config.toml")
    assert load_config(tmp_path / "run" / "config.toml") == c
    assert not [p for p in (tmp_path / "run").iterdir() if p.name != "config.toml"]


@pytest.mark.parametrize("name", tuple(PRESETS))
def test_preset_defaults_are_the_presets_settings(name):
    preset = get_preset(name)
    c = preset_defaults(preset)
    assert (c.optim.lr_m, c.optim.lr_full) == (preset.finetune.lr, preset.full_lr)
    assert (c.train.steps, c.train.batch_size) == (
        preset.finetune.steps,
        preset.finetune.batch_size,
    )
    assert apply_finetune_config(preset, c) is preset


def test_pipeline_takes_lr_and_steps_and_refuses_the_rest():
    preset = get_preset("tiny")
    base = preset_defaults(preset)
    c = resolve_config(
        base=base,
        overrides=["optim.lr_m=5e-3", "optim.lr_lora=5e-3", "train.steps=7", "optim.lr_full=1e-5"],
    )
    changed = apply_finetune_config(preset, c)
    assert (changed.finetune.lr, changed.finetune.steps, changed.full_lr) == (5e-3, 7, 1e-5)
    assert changed.finetune.seed == preset.finetune.seed and changed.lora == preset.lora
    assert "optim.lr_m" in PIPELINE_KEYS
    for override in ("optim.lr_lora=1e-2", "validation.fraction=0.5", "train.frames=4"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            apply_finetune_config(preset, resolve_config(base=base, overrides=[override]))


def test_config_command_prints_the_presets_defaults(capsys):
    assert main(["config", "--preset", "micro", "--set", "train.steps=9"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    expected = preset_defaults(get_preset("micro")).to_dict()
    expected["train"]["steps"] = 9
    assert printed == {
        s: {k: ("none" if v is None else v) for k, v in d.items()} for s, d in expected.items()
    }
    assert main(["config", "--set", "optim.nope=1"]) == 2
    assert "valid keys" in capsys.readouterr().err
