"""Reading a run folder back: the stage outputs a report is written from, and the statistics of
paired comparisons between methods."""

from __future__ import annotations

import statistics
from pathlib import Path

from attrspace.pipeline.cache import MARKER, StageFileError, read_json, read_marker, verify_outputs
from attrspace.pipeline.workspace import RUNS_FILE


def _marker(folder: Path, redo: str) -> dict | None:
    """The marker of a stage folder whose outputs all match their checksums (None: no marker).
    A report cannot redo a stage, so a damaged one is an error that names the command that can."""
    if not (folder / MARKER).exists():
        return None
    try:
        marker = read_marker(folder)
        problem = verify_outputs(folder, marker)
    except StageFileError as exc:
        problem = str(exc)
    if problem is not None:
        raise StageFileError(f"{problem}; `{redo}` redoes it")
    return marker


def collect(out: Path) -> dict:
    """Read the stage outputs of a run folder that its last invocation used (ran or took from the
    cache; everything when there is no runs.json): outputs of an earlier configuration that the
    last run no longer used are left out, so one report never mixes two configurations."""
    out = Path(out)
    info: dict = {"runs": [], "data": {}, "loras": {}, "finetune": {}}
    if (out / RUNS_FILE).exists():
        info["runs"] = read_json(out / RUNS_FILE, ("runs",))["runs"]
    used, redo = None, f"attrspace run --out {out}"
    if info["runs"]:
        last = info["runs"][-1]
        used = set(last["ran"]) | set(last["cached"])
        argv = last.get("argv")
        if isinstance(argv, list) and argv:
            redo = "attrspace " + " ".join(map(str, argv))
        else:
            redo = f"attrspace {last['command']} --preset {last['preset']} --out {out}"

    def marker(folder: Path) -> dict | None:
        key = folder.relative_to(out).as_posix()
        return _marker(folder, redo) if used is None or key in used else None

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
