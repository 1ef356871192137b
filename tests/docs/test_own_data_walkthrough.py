"""README "Fine-tune on your own data", end to end with its own commands at a reduced size:
scene folders -> a base and a mined bank -> `attrspace config` -> `attrspace finetune --data`
-> the adapter served by plain peft, equal to the adapted model.

WALKTHROUGH holds the README's steps; the test runs them with fewer and smaller scenes and
steps (the README's sizes: SCENES=8, SIZE=56, STEPS=60)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import attrspace

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

MAKE_SCENES = """
from attrspace.data.families import family_specs
from attrspace.data.folder import write_scene
from attrspace.data.render import render_scene

for i, spec in enumerate(family_specs("photo", 1, {scenes}, 4, seed=0)[0].scenes):
    r = render_scene(spec, {size})
    depths = r["depths"] if i % 2 else None  # scenes without depth train on the camera loss
    write_scene(f"scenes/scene{{i}}", r["images"], r["extrinsics"].float(),
                r["intrinsics"].float(), depths)
"""

SERVE = """
import peft
import torch

from attrspace.models.vggt import load_pretrained
from attrspace.pipeline.own_data import load_run

base, _ = load_pretrained("runs/micro/base")
served = peft.PeftModel.from_pretrained(base, "runs/ft/adapter").eval()
trained = load_run("runs/ft")  # the adapted model: base + bank + trained state
images = torch.rand(1, 4, 3, {size}, {size}, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    a, b = served(images), trained(images)
    with served.disable_adapter():
        plain = served(images)  # the base model: what the adapter changes
for key in ("pose_enc", "depth", "depth_conf"):
    diff, change = (a[key] - b[key]).abs().max(), (a[key] - plain[key]).abs().max()
    print(f"{{key}}: served vs trained {{diff:.1e}}, adapter's change {{change:.1e}}")
"""


def walkthrough(scenes: int, size: int, steps: int) -> list[list[str]]:
    """The README's commands (argv lists; `python -c` for its Python blocks)."""
    py = sys.executable
    return [
        [py, "-c", MAKE_SCENES.format(scenes=scenes, size=size)],
        [py, "-m", "attrspace", "mine", "--preset", "micro", "--out", "runs/micro", "--quiet"],
        [py, "-m", "attrspace", "config", "--preset", "micro"],  # > finetune.toml
        [
            py,
            "-m",
            "attrspace",
            "finetune",
            "--preset",
            "micro",
            "--data",
            "scenes",
            "--bank",
            "runs/micro",
            "--checkpoint",
            "runs/micro/base",
            "--out",
            "runs/ft",
            "--config",
            "finetune.toml",
            "--set",
            f"train.steps={steps}",
            "--set",
            f"validation.every={max(1, steps // 3)}",
        ],
        [py, "-c", SERVE.format(size=size)],
    ]


def package_path(tmp_path: Path) -> str:
    """A PYTHONPATH that finds this attrspace and nothing else of its source tree (the tree's
    top-level `kernels/` would shadow the `kernels` package that transformers imports)."""
    link = tmp_path / "site" / "attrspace"
    link.parent.mkdir()
    link.symlink_to(Path(attrspace.__file__).parent, target_is_directory=True)
    return str(link.parent)


def run(argv: list[str], cwd) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env["PYTHONPATH"] = package_path(cwd) if not (cwd / "site").exists() else str(cwd / "site")
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{argv[:4]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_walkthrough_serves_the_trained_adapter_in_plain_peft(tmp_path):
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    make, mine, config, finetune, serve = walkthrough(scenes=3, size=28, steps=4)
    run(make, tmp_path)
    run(mine, tmp_path)
    settings = run(config, tmp_path)
    (tmp_path / "finetune.toml").write_text(settings.replace("lr_m = 0.001", "lr_m = 0.005"))
    log = run(finetune, tmp_path)
    assert "validation" in log and (tmp_path / "runs/ft/adapter/adapter_config.json").is_file()
    resolved = tomllib.loads((tmp_path / "runs/ft/config.toml").read_text())
    assert resolved["optim"]["lr_m"] == 0.005 and resolved["train"]["steps"] == 4
    for line in run(serve, tmp_path).splitlines():
        words = line.split()
        diff, change = float(words[4].strip(",")), float(words[7])
        assert diff <= 1e-5 and change > 100 * diff, line
    # the same command again: the run is finished, nothing is redone
    assert "nothing to do" in run(finetune, tmp_path)


def test_the_readme_holds_the_commands_this_test_runs():
    """The walkthrough above runs the README's steps: a README edit that changes them fails here."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Fine-tune on your own data") :]
    section = section[: section.index("\n## ", 1)].replace("\\\n    ", "")
    make, mine, config, finetune, _ = walkthrough(scenes=8, size=56, steps=60)
    assert make[2].strip() in section
    for argv in (mine, config, finetune):
        words = [w for w in argv[3:] if w != "--quiet"]
        assert "attrspace " + " ".join(words) in section, words
