"""bench/bench_host.py runs every method and reports per-round figures (no timing is asserted)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_host  # the host-time benchmark of bench/


def test_every_method_is_timed_each_round():
    times = bench_host.measure(rounds=2, steps=3)
    assert {"frozen nn.Linear", "SubspaceLinear", "attrspace LoRA"} <= set(times)
    assert all(len(v) == 2 and min(v) > 0 for v in times.values())
    lines = bench_host.table(times)
    assert lines[1].startswith("frozen nn.Linear") and lines[1].split()[-2:] == ["1.00", "1.00"]
    assert len(lines) == 1 + len(times)
