"""Checking a set of peft LoRA folders before mining: layout, readability, layers, shapes, zero
updates; every refusal names the folder. And the CLI refuses before writing anything."""

import json
import shutil

import pytest
import torch

from attrspace import inject_lora, save_peft
from attrspace.cli.main import main
from attrspace.mining.peft_input import LoRAInputError, load_lora_set, lora_folders
from attrspace.models.vit import ADAPTED, TinyViT


def make_lora(folder, seed, dim=32, targets=ADAPTED, zero=False):
    torch.manual_seed(seed)
    model = TinyViT(dim=dim, depth=2, heads=2, in_dim=12)
    inject_lora(model, targets, rank=4, alpha=8)
    if not zero:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
    save_peft(model, folder)
    return folder


@pytest.fixture
def loras(tmp_path):
    root = tmp_path / "loras"
    for i, a in enumerate(("material", "pose")):
        for j in range(2):
            make_lora(root / a / f"run{j}", 10 * i + j)
    return root


def test_any_attribute_names_and_both_layouts(loras, tmp_path):
    (loras / "README.md").write_text("notes")  # a file at the top is not an attribute
    single = tmp_path / "loras" / "gloss"
    make_lora(single, 99)  # an attribute folder that is itself one adapter
    folders = lora_folders(loras)
    assert list(folders) == ["gloss", "material", "pose"]
    assert folders["gloss"] == [single] and len(folders["material"]) == 2
    data = load_lora_set(folders)
    assert len(data.shapes) == 8 and data.shapes["blocks.0.mlp.fc1"] == (128, 32)
    assert data.ranks == {"gloss": [4], "material": [4, 4], "pose": [4, 4]}
    assert len(data.updates["material"]["blocks.1.attn.qkv"]) == 2


def test_refusals_name_the_folder(loras, tmp_path):
    other = make_lora(tmp_path / "x" / "narrow", 5, targets=("attn.qkv", "attn.proj"))
    with pytest.raises(LoRAInputError, match=r"narrow: adapts other layers than .*missing"):
        load_lora_set({"a": [loras / "material" / "run0"], "b": [other]})
    wide = make_lora(tmp_path / "x" / "wide", 6, dim=48)
    with pytest.raises(LoRAInputError, match=r"wide: layer blocks.0.attn.proj is 48 x 48"):
        load_lora_set({"a": [loras / "material" / "run0"], "b": [wide]})
    zero = make_lora(tmp_path / "x" / "untrained", 7, zero=True)
    with pytest.raises(LoRAInputError, match=r"untrained: every lora_B is zero"):
        load_lora_set({"a": [zero]})
    with pytest.raises(LoRAInputError, match=r"run0: listed twice"):
        load_lora_set({"a": [loras / "pose" / "run0"], "b": [loras / "pose" / "run0"]})
    with pytest.raises(LoRAInputError, match=r"'a\|b'"):
        load_lora_set({"a|b": [loras / "pose" / "run0"]})
    (loras / "pose" / "run1" / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoRAInputError, match=r"pose/run1/adapter_config.json: .*not JSON"):
        load_lora_set(lora_folders(loras))
    (loras / "pose" / "stray.txt").write_text("x")
    with pytest.raises(LoRAInputError, match=r"pose: \['stray.txt'\] not peft adapter folders"):
        lora_folders(loras)
    with pytest.raises(LoRAInputError, match=r"is one adapter folder"):
        lora_folders(loras / "material" / "run0")


def test_cli_refuses_in_one_line_before_writing(loras, tmp_path, capsys):
    config = loras / "pose" / "run1" / "adapter_config.json"
    data = json.loads(config.read_text())
    data["r"] = 8  # ranks in the config no longer fit the weights
    config.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert main(["mine", "--loras", str(loras), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attrspace mine: error: ") and "pose/run1" in err and "\n" not in err
    assert not out.exists()
    assert main(["mine", "--loras", str(loras), "--out", str(out), "--device", "cpu"]) == 2
    assert "--device has no effect with --loras" in capsys.readouterr().err
    shutil.rmtree(loras / "pose")
    run = tmp_path / "run"
    assert main(["run", "--loras", str(loras), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "not used ['material']" in err and "`attrspace mine --loras` takes any names" in err
    assert not run.exists()  # refused before the pipeline rendered anything
