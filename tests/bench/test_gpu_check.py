"""bench/gpu_check.sh is syntax-clean and its Python steps (bench/gpu_check.py) run on the CPU at
small shapes, with a fake timer (no timing is asserted)."""

import shutil
import subprocess
import sys
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
    """The summary block of gpu_check.sh (its Python here-document) on results made on the CPU."""
    import json

    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    summary = script.split("<<'PYEOF'", 1)[1].split("\n", 1)[1].split("\nPYEOF", 1)[0]

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
    out = subprocess.run(
        [sys.executable, "-", str(tmp_path)], input=summary, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "smoke torch   max rel. error" in out.stdout
    assert "smoke cuda    cannot run here" in out.stdout
    assert "subspace K=4 [torch]" in out.stdout and "svd 2 x [24, 16] rank 4" in out.stdout
