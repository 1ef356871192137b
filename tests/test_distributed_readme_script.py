"""The README's "Scaling out" script, taken from README.md itself, runs clean for 10 epochs in both
modes under `torchrun --nproc_per_node=2` with the CPU substitutions the README states (gloo, the
CPU device, VGGTConfig.tiny() with random weights, a random K=4 bank, synthetic scenes): exit
status 0, no abort at interpreter exit, and a peft folder that loads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attrspace.data.storage import write_family
from attrspace.export import load_peft

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = """torch.manual_seed(0)
model = VGGT(VGGTConfig.tiny(enable_point=False, gradient_checkpointing=True))
from attrspace.bank import linear_shapes, random_bank
from attrspace.models.vggt.params import block_linear_names

shapes = linear_shapes(model, tuple(block_linear_names(model)))"""
# README text -> its CPU substitute; every left side must be found, so a changed README fails here.
SUBSTITUTIONS = {
    'dist.init_process_group("nccl")': 'dist.init_process_group("gloo")',
    'device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))': 'device = torch.device("cpu")',
    "torch.cuda.set_device(device)": "",
    'with torch.device("meta"):\n    model = VGGT(VGGTConfig.vggt_1b(enable_point=False, '
    "gradient_checkpointing=True))": TINY_MODEL,
    'load_checkpoint(model, "facebook/VGGT-1B")': "",
    'attrspace.SubspaceBank.load("bank.safetensors")': "random_bank(shapes, 4, seed=0)",
    "DistributedDataParallel(model, device_ids=[device.index])": "DistributedDataParallel(model)",
    'MultiViewDataset("data/my_family")': "MultiViewDataset(sys.argv[2])",
    'save_adapter(model, "adapter/"': "save_adapter(model, sys.argv[3]",
}


def readme_script() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(# finetune\.py: torchrun.*?)```", text, re.S)
    assert match, "README.md has no block starting with '# finetune.py: torchrun'"
    script = match.group(1)
    assert "for epoch in range(10):" in script
    for old, new in SUBSTITUTIONS.items():
        assert old in script, f"the README script no longer holds {old!r}"
        script = script.replace(old, new)
    return script


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    write_family(root / "data", "geometry", 1, 2, 2, 28, seed=0)  # 1 step per rank per epoch
    (root / "finetune.py").write_text(readme_script())
    return root


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_readme_script_runs_clean_for_10_epochs(setup, mode):
    out = setup / f"adapter_{mode}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    result = subprocess.run(
        [*command, str(setup / "finetune.py"), mode, str(setup / "data"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, log
    assert "terminate called" not in result.stderr, log
    factors = load_peft(out)
    assert factors  # every adapted layer, as peft reads the folder
