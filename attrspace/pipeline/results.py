"""Reading a run folder back: the stage outputs a report is written from, and the statistics of
paired comparisons between methods."""

from __future__ import annotations

import statistics
from pathlib import Path

from .cache import MARKER, read_json
from .run import RUNS_FILE


def _marker(folder: Path) -> dict | None:
    path = folder / MARKER
    return read_json(path, ("seconds",)) if path.exists() else None


def collect(out: Path) -> dict:
    """Read the stage outputs of a run folder that its last invocation used (ran or took from the
    cache; everything when there is no runs.json): outputs of an earlier configuration that the
    last run no longer used are left out, so one report never mixes two configurations."""
    out = Path(out)
    info: dict = {"runs": [], "data": {}, "loras": {}, "finetune": {}}
    if (out / RUNS_FILE).exists():
        info["runs"] = read_json(out / RUNS_FILE, ("runs",))["runs"]
    used = None
    if info["runs"]:
        used = set(info["runs"][-1]["ran"]) | set(info["runs"][-1]["cached"])

    def marker(folder: Path) -> dict | None:
        key = folder.relative_to(out).as_posix()
        return _marker(folder) if used is None or key in used else None

    for folder in sorted((out / "data").glob("*")):
        found = marker(folder)
        if found:
            info["data"][folder.name] = found
    base = marker(out / "base")
    if base:
        info["base"] = base
        if (out / "base" / "curve.json").exists():
            info["base_curve"] = read_json(out / "base" / "curve.json", ("objective",))
    for folder in sorted((out / "loras").glob("*/*")):
        found = marker(folder)
        if found:
            entry = {"marker": found, **read_json(folder / "curve.json", ("objective",))}
            info["loras"].setdefault(folder.parent.name, {})[folder.name] = entry
    found = marker(out / "mine")
    if found:
        info["mine"] = read_json(out / "mine" / "summary.json", ("layers", "attributes", "K"))
        info["mine_marker"] = found
    for folder in sorted((out / "finetune").glob("*/*")):
        found = marker(folder)
        if found:
            record = read_json(folder / "metrics.json", ("status", "method", "task"))
            record["seconds"] = found["seconds"]
            if (folder / "curve.json").exists():
                record["curve"] = read_json(folder / "curve.json", ("objective",))["objective"]
            info["finetune"].setdefault(folder.parent.name, {})[folder.name] = record
    return info


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a_i - b_i over paired scenes and its standard error (0 for one scene)."""
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired lists must be non-empty and of equal length, got {len(a)}, {len(b)}"
        )
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return statistics.fmean(diffs), se
