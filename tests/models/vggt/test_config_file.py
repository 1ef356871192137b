"""The model config as config.json: round trips, refusals, the official subset, and a model folder
(config.json + model.safetensors) that load_pretrained rebuilds with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch

from attrspace.models.vggt import VGGT, VGGTConfig, load_pretrained
from attrspace.pipeline.weights import save_weights


@pytest.mark.parametrize("name", ["tiny", "small", "vggt_1b"])
def test_round_trip(tmp_path, name):
    config = getattr(VGGTConfig, name)(enable_point=False, gradient_checkpointing=True)
    assert VGGTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    config.save(tmp_path / "config.json")
    assert VGGTConfig.load(tmp_path) == config


def test_refusals_name_the_key(tmp_path):
    path = tmp_path / "config.json"
    cases = {
        '{"depht": 2}': r"config.json: unknown keys \['depht'\]; valid keys: .*dpt_layers",
        '{"depth": 2.5}': r"config.json: depth must be an int, got 2.5",
        '{"enable_point": 1}': r"config.json: enable_point must be true or false, got 1",
        '{"dpt_layers": [0, 1, "2", 3]}': r"config.json: dpt_layers must be a list of ints",
        '{"depth": 2}': r"config.json: dpt_layers \(4, 11, 17, 23\) out of range for depth 2",
        "[1]": r"config.json: expected a JSON object",
        "{": r"config.json: not valid JSON",
    }
    for text, pattern in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=pattern):
            VGGTConfig.load(path)
    with pytest.raises(FileNotFoundError, match=r"nothing: no model config"):
        VGGTConfig.load(tmp_path / "nothing")


def test_official_config_keys():
    config = VGGTConfig.from_dict(
        {"img_size": 518, "patch_size": 14, "embed_dim": 1024, "enable_track": True}
    )
    assert config == VGGTConfig.vggt_1b()


def test_model_folder_loads_as_written(tmp_path):
    torch.manual_seed(0)
    config = VGGTConfig.tiny(enable_point=False)
    source = VGGT(config).eval()
    save_weights(source, tmp_path / "model.safetensors", "0" * 64)  # as the pipeline writes base/
    config.save(tmp_path / "config.json")
    model, report = load_pretrained(tmp_path, changes={"gradient_checkpointing": True})
    assert report.ok and model.config == config.replace(gradient_checkpointing=True)
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        want, got = source(images), model.eval()(images)
    for key in ("pose_enc", "depth", "depth_conf"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_pretrained(tmp_path / "model.safetensors")
