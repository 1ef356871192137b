"""Running the stages in order, each one resuming from its cache, and recording the run."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

from attrspace.pipeline import spread
from attrspace.pipeline.cache import StageFileError, read_json, write_json_atomic
from attrspace.pipeline.presets import Preset
from attrspace.pipeline.report.document import write_report
from attrspace.pipeline.stages.finetune import finetune_stage
from attrspace.pipeline.stages.lora import lora_stage
from attrspace.pipeline.stages.mining import mine_stage
from attrspace.pipeline.stages.pretrain import pretrain_stage
from attrspace.pipeline.stages.render import render_stage
from attrspace.pipeline.study import study_stage
from attrspace.pipeline.workspace import RUNS_FILE, RunInputError, Workspace, torch_threads
from attrspace.util.folders import folder_lock, writable_folder

STAGES = ("render", "pretrain", "train-lora", "mine", "finetune")

LOCK_FILE = ".lock"  # OUT/.lock, with the holder in OUT/.lock.owner (attrspace.util.folders)


def run_folder_lock(out: Path):
    """The lock every command that writes into run folder `out` holds while it runs."""
    return folder_lock(out, Path(out) / LOCK_FILE)


def prepare_run_folder(out: str | os.PathLike) -> Path:
    """Create run folder `out` (and its parents); RunInputError naming the path when it is empty,
    a file, under a file, or cannot be written."""
    if not str(out).strip():
        raise RunInputError("the run folder must be named (got an empty path)")
    return writable_folder(Path(out), "run folder", RunInputError)


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_stages(ws: Workspace, until: str = "finetune") -> dict:
    """Run every stage up to and including `until` (earlier ones come from the cache when done).
    Returns the digests and outputs of the stages that were reached."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; choose one of {STAGES}")
    last = STAGES.index(until)
    out: dict = {}
    # Under torchrun the ranks split the LoRA, fine-tuning and study-arm jobs
    # (attrspace.pipeline.spread); one-job stages run on rank 0, the others read its cached results.
    with torch_threads(ws.preset.threads):
        ws.say(f"[1/5] render ({ws.out / 'data'})")
        out["data"] = spread.run_on_leader(render_stage, ws)
        if last >= 1:
            ws.say("[2/5] base model")
            out["base"] = spread.run_on_leader(pretrain_stage, ws)
        if last >= 2:
            ws.say("[3/5] attribute LoRAs")
            out["loras"] = spread.run_spread(lora_stage, ws, out["base"])
        if last >= 3:
            ws.say("[4/5] mining")
            out["mine"] = spread.run_on_leader(mine_stage, ws, out["base"], out["loras"])
        if last >= 4:
            ws.say("[5/5] fine-tuning")
            out["finetune"] = spread.run_spread(finetune_stage, ws, out["base"], out["mine"])
        if last >= 4 and ws.preset.study is not None:
            ws.say("[5/5] study: control banks, statistics, arms x seeds")
            # every rank: it spreads its own jobs
            out["study"] = study_stage(ws, out["base"], out["loras"], out["mine"])
    return out


def command_argv(argv: list[str] | None = None) -> list[str] | None:
    """The command's arguments: `argv` when the caller knows them (the CLI passes its own), else
    sys.argv[1:] when this process is the attrspace command (`attrspace ...`, `python -m attrspace`,
    `torchrun -m attrspace`), else None (a script of the user's)."""
    if argv is not None:
        return list(argv)
    first = Path(sys.argv[0])
    if first.name == "attrspace" or (
        first.name == "__main__.py" and first.parent.name == "attrspace"
    ):
        return sys.argv[1:]
    return None


def record_run(
    ws: Workspace,
    command: str,
    started: float,
    load_before,
    wall: float,
    argv: list[str] | None = None,
) -> dict:
    """Append this invocation (wall time, machine, load, what ran) to OUT/runs.json."""
    path = ws.out / RUNS_FILE
    runs = []
    if path.exists():
        try:
            runs = read_json(path, ("runs",))["runs"]
            if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
                raise StageFileError(f"{path}: 'runs' is not a list of run records")
        except StageFileError as exc:
            aside = path.with_name(f"{RUNS_FILE}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(path, aside)  # the history stays readable by hand, never dropped
            runs = []
            print(
                f"attrspace: {exc}; kept it as {aside} and started a new run log", file=sys.stderr
            )
    entry = {
        "command": command,
        "argv": command_argv(argv),
        "preset": ws.preset.name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_seconds": wall,
        "load_before": load_before,
        "load_after": _load(),
        "machine": machine(),
        "ran": ws.ran(),
        "cached": [k for k, s in ws.events if s == "cached"],
        "device": str(ws.device),
        "threads": ws.preset.threads or torch.get_num_threads(),
    }
    runs.append(entry)
    write_json_atomic(path, {"runs": runs})
    return entry


def run_pipeline(
    preset: Preset,
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    loras_dir: str | os.PathLike | None = None,
    progress: bool = True,
    until: str = "finetune",
    report: bool = True,
    command: str = "run",
    argv: list[str] | None = None,
) -> Workspace:
    """Run the pipeline into `out` (resuming from whatever is cached there), record the run and,
    after the last stage, write out/report.md. Returns the workspace (its events list what ran).

    Holds the run folder's lock throughout: a second process on the same folder gets
    FolderBusyError naming the holder. `argv`: the command line recorded in runs.json (default:
    this process's, when it is the attrspace command)."""
    if not str(out).strip():
        raise RunInputError("the run folder must be named (got an empty path)")
    with spread.process_group():
        leader = spread.is_leader()
        ws = Workspace(Path(out), preset, checkpoint, loras_dir, progress and leader)
        prepare_run_folder(ws.out)
        # Rank 0 holds the lock for the whole job; the other ranks write only the jobs it hands them.
        with run_folder_lock(ws.out) if leader else contextlib.nullcontext():
            started, load_before = time.time(), _load()
            tick = time.perf_counter()
            run_stages(ws, until)
            if not leader:
                return ws
            wall = time.perf_counter() - tick
            entry = record_run(ws, command, started, load_before, wall, argv)
            if report and until == "finetune":
                path = write_report(ws.out)
                ws.say(f"report: {path}")
        ws.say(
            f"{command}: {entry['wall_seconds']:.1f} s ({len(entry['ran'])} pieces of work done, "
            f"{len(entry['cached'])} from the cache)"
        )
    return ws
