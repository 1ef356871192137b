"""The README's "Save and resume M itself" snippet, run as written: a fresh model with the same base
and bank resumes to the trained model's outputs."""

import copy
import re
from pathlib import Path

import torch

import attrspace
from attrspace.bank import random_bank
from attrspace.models.vit import ADAPTED, TinyViT

README = Path(__file__).resolve().parents[2] / "README.md"


def snippet() -> str:
    text = README.read_text()
    section = text[text.index("**Save and resume M itself.**") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def injected(base, bank):
    model = copy.deepcopy(base)
    attrspace.inject(model, bank)
    attrspace.inject_lora(model, ["head"], rank=2, alpha=4)
    return model


def test_readme_save_and_resume_m(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    base = TinyViT(dim=32, depth=2, heads=2, in_dim=12)
    names = [f"blocks.{i}.{n}" for i in range(2) for n in ADAPTED]
    shapes = {n: tuple(base.get_submodule(n).weight.shape) for n in names}
    bank = random_bank(shapes, 4, scale=2.0, seed=1)
    model = injected(base, bank)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    code = snippet()
    cut = code.index("# later")
    save, resume = code[:cut], code[code.index("\n", cut) + 1 :]
    namespace = {"model": model}
    exec(compile(save, "README.md", "exec"), namespace)
    fresh = injected(base, bank)
    x = torch.randn(2, 16, 12)
    with torch.no_grad():
        assert (fresh(x) - model(x)).abs().max() > 1e-3
    namespace["model"] = fresh
    exec(compile(resume, "README.md", "exec"), namespace)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
