"""The README's "Mine a bank from your own LoRAs" example, run exactly as written, then the same
LoRAs mined from the command line."""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="peft is a test dependency; CI installs it")
pytest.importorskip("matplotlib", reason="matplotlib is a test dependency; CI installs it")

from attrspace import SubspaceBank
from attrspace.cli.main import main

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "## Mine a bank from your own LoRAs (any model)"


def readme_snippet() -> str:
    text = README.read_text()
    section = text[text.index(HEADING) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_mine_peft_example_runs_and_the_cli_mines_the_same_bank(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)
    mined = tmp_path / "mined"
    for name in ("bank.safetensors", "summary.json", "spectra.png", "overlaps.png", "report.md"):
        assert (mined / name).stat().st_size > 0, name
    bank = SubspaceBank.load(mined / "bank.safetensors")
    assert set(bank.attributes) == {"shift", "mirror"}
    assert len(bank.layers) == 8  # 2 blocks x qkv, proj, fc1, fc2
    report = (mined / "report.md").read_text()
    assert "| shift | 2 | 4, 4 |" in report and "mirror / shift" in report
    # The injected model runs and trains only M.
    base = namespace["base"]
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".M") for n in trainable)
    base(torch.randn(2, 32, 16)).sum().backward()

    assert main(["mine", "--loras", "loras", "--out", "cli", "--quiet"]) == 0
    again = SubspaceBank.load(tmp_path / "cli" / "bank.safetensors")
    for name, layer in bank.layers.items():
        assert torch.equal(layer.U, again.layers[name].U), name
        assert torch.equal(layer.V, again.layers[name].V), name
