"""bench/gpu_check.sh is syntax-clean, its dry run survives the limits of a device run's one shot, and
its Python steps (bench/gpu_check.py) run on the CPU at small shapes, with a fake timer (no timing is
asserted)."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_shell_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)


def test_work_floor():
    assert gpu_check.work_floor(1024, 3072, 64) == pytest.approx(1.0833, abs=1e-4)
    assert gpu_check.work_floor(1024, 3072, 16) == pytest.approx(1.0208, abs=1e-4)


def test_smoke_of_the_torch_backend_is_exact_enough():
    result = gpu_check.smoke("torch", shape=(33, 40, 24, 8), dtype=torch.float32, device="cpu")
    assert set(result["errors"]) == {"y", "z", "dx", "g"}
    assert max(result["errors"].values()) < 1e-5, result


def test_smoke_reports_a_backend_that_cannot_run():
    result = gpu_check.smoke("cuda", shape=(8, 16, 12, 4), dtype=torch.float32, device="cpu")
    assert result["skipped"] and "errors" not in result


def test_timings_rows_and_ratios():
    calls = []

    def timer(step, rounds=20):
        step()
        calls.append(1)
        return 0.002 if len(calls) == 1 else 0.003

    result = gpu_check.timings(
        shape=(16, 32, 24, 4), dtype=torch.float32, device="cpu", timer=timer
    )
    rows = result["rows"]
    assert rows["frozen"]["x_frozen"] == 1.0
    assert "subspace K=4 [torch]" in rows and "LoRA r=16" in rows
    assert rows["LoRA r=16"]["x_frozen"] == pytest.approx(1.5)
    assert result["work_floor_F"] == pytest.approx(1 + 4 * 56 / (32 * 24))
    assert result["matmul_ceiling_tflops"] > 0


def test_svd_step_runs():
    def timer(step, rounds):
        step()
        return 1.0

    result = gpu_check.svd(device="cpu", batch=2, size=(24, 16), rank=4, timer=timer)
    assert result["speedup"] == 1.0 and result["batch"] == 2


def test_summary_reads_the_step_results(tmp_path):
    """gpu_check.summary on results made on the CPU: one line per smoke, timings and svd, an
    unreadable file named, and every result merged into one JSON file."""
    import json

    def timer(step, rounds=20):
        step()
        return 0.001

    cpu = {"dtype": torch.float32, "device": "cpu"}
    results = {
        "smoke_torch.json": gpu_check.smoke("torch", shape=(8, 16, 12, 4), **cpu),
        "smoke_cuda.json": gpu_check.smoke("cuda", shape=(8, 16, 12, 4), **cpu),
        "timings.json": gpu_check.timings(shape=(8, 16, 12, 4), timer=timer, **cpu),
        "svd.json": gpu_check.svd(device="cpu", batch=2, size=(24, 16), rank=4, timer=timer),
    }
    for name, result in results.items():
        (tmp_path / name).write_text(json.dumps(result))
    (tmp_path / "broken.json").write_text("{")
    merged = tmp_path / "merged" / "results.json"
    merged.parent.mkdir()
    text = "\n".join(gpu_check.summary(tmp_path, merged))
    assert "smoke torch   max rel. error" in text
    assert "smoke cuda    cannot run here" in text
    assert "subspace K=4 [torch]" in text and "svd 2 x [24, 16] rank 4" in text
    assert "broken.json could not be read" in text
    assert set(json.loads(merged.read_text())) == {"smoke_torch", "smoke_cuda", "timings", "svd"}


def _plan(script: str) -> tuple[list[int], int, int]:
    """(step limits, reserve, default budget) as declared in gpu_check.sh."""
    plan = re.search(r"^PLAN=\((.*)\)$", script, re.MULTILINE).group(1).split()
    reserve = int(re.search(r"^RESERVE_S=(\d+)", script, re.MULTILINE).group(1))
    budget = int(re.search(r"CHECK_BUDGET_S:-(\d+)", script).group(1))
    return [int(p.split(":")[1]) for p in plan], reserve, budget


def test_step_limits_add_up_inside_the_budget(tmp_path):
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    limits, reserve, budget = _plan(script)
    assert len(limits) == 6 and sum(limits) + reserve <= budget
    # a budget the steps do not fit is refused before anything runs or is written
    env = {**os.environ, "OUT": str(tmp_path / "out"), "CHECK_BUDGET_S": str(sum(limits))}
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "over CHECK_BUDGET_S" in out.stdout, out.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_dry_run_brings_back_few_shallow_files(tmp_path):
    """The dry run (the CPU stand-in of the one GPU shot): at most 8 files in $OUT, none deeper than
    2 folders, names a device run can return, caches outside $OUT, and every step ok."""
    out_dir, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out_dir), "CHECK_WORK": str(work), "CHECK_DRY_RUN": "1"}
    env.pop("PYTHONPATH", None)  # the script must find the tree's attrspace by itself
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=470,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["logs.tar.gz", "results.json", "summary.txt"]
    assert all(len(p.relative_to(out_dir).parts) <= 3 for p in out_dir.rglob("*"))
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for p in files for part in p.parts[-1:])
    assert (work / "cache").is_dir() and not (out_dir / "cache").exists()
    summary = (out_dir / "summary.txt").read_text()
    for name in ("env", "build", "smoke", "timings", "svd", "tests"):
        assert re.search(rf"^{name} +ok \(", summary, re.MULTILINE), summary
    assert "smoke torch   max rel. error" in summary and "tests:" in summary
    with tarfile.open(out_dir / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/check.log", "logs/tests.log", "results/timings.json"} <= names
    results = json.loads((out_dir / "results.json").read_text())
    assert results["smoke_torch"]["errors"]["y"] < 1e-4
