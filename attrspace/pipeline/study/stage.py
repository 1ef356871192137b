"""The study stage: LoRA sets, banks, statistics, learning rates and every arm, in that order
(docs/study/protocol.md)."""

from __future__ import annotations

from pathlib import Path

from attrspace.export.peft_folder import WEIGHTS_NAME
from attrspace.pipeline import spread
from attrspace.pipeline.study.arms import arms_stage, split_scenes
from attrspace.pipeline.study.banks import banks_stage, lora_set_stage
from attrspace.pipeline.study.evidence import stats_stage
from attrspace.pipeline.study.lr import lr_stage
from attrspace.pipeline.workspace import Workspace


def study_stage(ws: Workspace, base: str, folders: dict[str, list[Path]], mined: str) -> dict:
    """LoRA sets, banks, statistics, learning rates and every arm (see the module doc)."""
    if ws.preset.study is None:
        raise ValueError(f"preset {ws.preset.name!r} defines no study")
    missing = [a for a, ps in folders.items() for p in ps if not (p / WEIGHTS_NAME).is_file()]
    if missing:
        raise ValueError(f"LoRA weights missing for attributes {sorted(set(missing))}")
    # Called on every rank under torchrun: one-job parts on rank 0, LoRAs and arms spread.
    sets = [folders]
    for lora_set in range(1, ws.preset.study.lora_sets):
        sets.append(spread.run_spread(lora_set_stage, ws, base, lora_set))
    banks = spread.run_on_leader(banks_stage, ws, sets, mined)
    _, val, _ = split_scenes(ws)
    stats = [spread.run_on_leader(stats_stage, ws, base, s, i, val) for i, s in enumerate(sets)]
    rates = spread.run_on_leader(lr_stage, ws, base, banks)
    arms = spread.run_spread(arms_stage, ws, base, banks, rates)
    return {"banks": banks, "stats": stats, "rates": rates, "arms": arms}
