"""bench/bench_launcher.py runs (in its own process: it replaces the fused kernel by a stub) and
reports its three interleaved rows; no timing is asserted."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_launcher.py"


def test_launcher_bench_reports_its_rows():
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--rounds", "1", "--steps", "3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("  ")[0] for line in run.stdout.splitlines()[1:]]
    assert rows == ["wrappers, plain helpers", "wrappers, triton's", "one torch.mm"], run.stdout
