"""Every study arm's peak learning rate, chosen on the validation scenes (OUT/study/lr/).

Each arm starts from its kind's grid (presets.STUDY_LR_GRIDS) and is fine-tuned at every rate with
the same steps, the same validation batch order and bank draw 0; the rate with the lowest mean
validation error wins. While the winner is at an end of the grid, the grid grows by a factor of 3
on that side (at most StudyConfig.widen times); a winner still at the edge is reported as such.
The subspace arm's rate is M's: its heads' LoRA keeps the heads arm's chosen rate (arms.fine_tune),
so the heads arm is chosen first. Each (arm, rate) is its own cache unit.
"""

from __future__ import annotations

import math
import time

from attrspace.pipeline.cache import (
    clear_marker,
    digest,
    file_sha256,
    is_done,
    read_json,
    write_json_atomic,
    write_marker,
)
from attrspace.pipeline.presets import STUDY_LR_GRIDS, study_arm_kind
from attrspace.pipeline.stages.common import data_digest, derived_seed
from attrspace.pipeline.stages.evaluate import error_terms
from attrspace.pipeline.study.arms import RECORD_FILE, fine_tune, split_scenes
from attrspace.pipeline.study.banks import arm_bank_path
from attrspace.pipeline.workspace import Workspace

RATES_FILE = "rates.json"


def lr_label(lr: float) -> str:
    return f"lr{lr:.3g}"


def _val_digest(ws: Workspace, base: str, banks: str, arm: str, lr: float, heads_lr) -> str:
    preset = ws.preset
    bank = None
    if arm.startswith("bank:") or arm == "subspace":
        bank = file_sha256(arm_bank_path(ws, "mined" if arm == "subspace" else arm[5:], 0))
    return digest(
        "study-lr",
        arm,
        lr,
        heads_lr,
        base,
        banks,
        data_digest(ws, preset.study.task),
        preset.study.task,
        preset.study.val_scenes,
        preset.data.task_train_scenes,
        preset.finetune,
        preset.lora_rank,
        preset.lora_alpha,
        preset.seed,
        bank,
    )


def val_run(ws: Workspace, base: str, banks: str, arm: str, lr: float, heads_lr) -> dict:
    """One arm at one rate: fine-tuned on the train scenes, its error on the validation scenes."""
    folder = ws.out / "study" / "lr" / arm.replace(":", "_") / lr_label(lr)
    expected = _val_digest(ws, base, banks, arm, lr, heads_lr)
    key = folder.relative_to(ws.out).as_posix()
    if is_done(folder, expected):
        ws.record(key, "cached")
        return read_json(folder / RECORD_FILE, ("arm", "lr", "val_error"))
    clear_marker(folder)
    start = time.perf_counter()
    train, val, _ = split_scenes(ws)
    record = {"arm": arm, "lr": lr}
    data_seed = derived_seed(ws.preset.seed, "study", ws.preset.study.task, "data", "val")
    try:
        model, facts = fine_tune(ws, base, arm, 0, lr, heads_lr, train, data_seed, "val")
        record.update(facts)
        record["val_error"] = error_terms(model, val, ws.device)["error"]
        if not math.isfinite(record["val_error"]):
            raise FloatingPointError(f"validation error {record['val_error']}")
        record["status"] = "ok"
    except FloatingPointError as exc:
        record.update(val_error=None, status="diverged", error=str(exc))
    write_json_atomic(folder / RECORD_FILE, record)
    write_marker(folder, "study-lr", expected, time.perf_counter() - start)
    ws.record(key, "ran")
    return record


def choose_rate(ws: Workspace, base: str, banks: str, arm: str, heads_lr) -> dict:
    """The grid search of one arm (see the module doc)."""
    grid = list(dict(STUDY_LR_GRIDS)[study_arm_kind(arm)])
    errors: dict[float, float] = {}
    widened = 0
    while True:
        for lr in grid:
            if lr not in errors:
                r = val_run(ws, base, banks, arm, lr, heads_lr)
                errors[lr] = r["val_error"] if r["status"] == "ok" else math.inf
        best = min(grid, key=lambda x: errors[x])
        at_low, at_high = best == grid[0], best == grid[-1]
        if not (at_low or at_high) or widened >= ws.preset.study.widen:
            break
        widened += 1
        if at_low:
            grid.insert(0, grid[0] / 3)
        else:
            grid.append(grid[-1] * 3)
    if math.isinf(errors[best]):
        raise FloatingPointError(f"study arm {arm}: every learning rate of {grid} diverged")
    return {
        "grid": grid,
        "val_errors": [errors[x] if math.isfinite(errors[x]) else None for x in grid],
        "chosen": best,
        "at_edge": best in (grid[0], grid[-1]),
        "val_error": errors[best],
    }


def zero_shot_val(ws: Workspace, base: str) -> float:
    _, val, _ = split_scenes(ws)
    return error_terms(ws.load_base(base), val, ws.device)["error"]


def lr_stage(ws: Workspace, base: str, banks: str) -> dict[str, float]:
    """Every trained arm's chosen rate (arm -> lr); the grids and validation errors, with the
    zero-shot validation error, go to OUT/study/lr/rates.json."""
    searches = {}
    for arm in ws.preset.study.arms():
        if arm == "zero-shot":
            continue
        heads_lr = searches["heads"]["chosen"] if arm == "subspace" else None
        searches[arm] = choose_rate(ws, base, banks, arm, heads_lr)
        if arm == "subspace":
            searches[arm]["heads_lr"] = heads_lr
    summary = {"zero_shot_val_error": zero_shot_val(ws, base), "arms": searches}
    write_json_atomic(ws.out / "study" / "lr" / RATES_FILE, summary)
    return {arm: s["chosen"] for arm, s in searches.items()}
