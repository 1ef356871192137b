"""bench/bench_launcher.py runs (in its own process: it replaces the fused kernel by a stub) and
reports both rows for either set of integer helpers; no timing is asserted."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_launcher.py"


@pytest.mark.parametrize("helpers", [[], ["--triton-helpers"]])
def test_launcher_bench_reports_both_rows(helpers):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--rounds", "1", "--steps", "3", *helpers],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert ("triton's" if helpers else "plain") in lines[0]
    assert lines[1].startswith("launch wrappers, fwd+bwd") and lines[2].startswith("one torch.mm")
