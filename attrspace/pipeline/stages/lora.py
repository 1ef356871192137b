"""Stage "train-lora": one LoRA per dataset of each attribute family, in peft's layout under
OUT/loras/<attribute>/<dataset>/ (or the folders of --loras DIR)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from attrspace.adapters.inject import inject_lora
from attrspace.export.peft_folder import CONFIG_NAME, save_peft
from attrspace.models.vggt.params import adaptation_targets
from attrspace.pipeline import spread
from attrspace.pipeline.cache import (
    clear_marker,
    digest,
    is_done,
    stage_output,
    write_json_atomic,
    write_marker,
)
from attrspace.pipeline.stages.common import curve, data_digest, derived_seed, train_job
from attrspace.pipeline.workspace import Workspace


def _external_loras(ws: Workspace) -> dict[str, list[Path]]:
    """LoRA folders of a --loras DIR laid out as DIR/<attribute>/<dataset>/."""
    found, missing = {}, []
    for a in ws.preset.attributes:
        root = ws.loras_dir / a
        folders = sorted(p for p in root.glob("*") if (p / CONFIG_NAME).is_file())
        if not folders:
            missing.append(a)
        found[a] = folders
    if missing:
        raise ValueError(
            f"{ws.loras_dir}: no peft LoRA folders (<attribute>/<dataset>/{CONFIG_NAME}) for "
            f"attributes {missing}"
        )
    return found


def lora_stage(ws: Workspace, base: str) -> dict[str, list[Path]]:
    """One LoRA ("paper-lora" targets: block linears and heads) per dataset of each attribute
    family, saved in peft's layout under OUT/loras/<attribute>/<dataset>/ with curve.json; each is
    its own cache unit, so an interrupted stage resumes LoRA by LoRA.
    Returns attribute -> folders."""
    if ws.loras_dir is not None:
        return _external_loras(ws)
    preset = ws.preset
    folders: dict[str, list[Path]] = {}
    jobs = 0
    for a in preset.attributes:
        folders[a] = []
        family_digest = data_digest(ws, a)
        for name in ws.dataset_names(a):
            folder = ws.out / "loras" / a / name
            folders[a].append(folder)
            jobs += 1
            if spread.skip(jobs - 1):  # another rank's job under torchrun
                continue
            seed = derived_seed(preset.seed, "lora", a, name)
            expected = digest(
                "lora",
                base,
                family_digest,
                name,
                preset.lora,
                preset.lora_rank,
                preset.lora_alpha,
                seed,
            )
            if is_done(folder, expected):
                ws.record(f"loras/{a}/{name}", "cached")
                continue
            spread.claim(folder)
            clear_marker(folder)
            start = time.perf_counter()
            model = ws.load_base(base)
            torch.manual_seed(seed)  # LoRA A init
            targets = adaptation_targets(model, "paper-lora").lora
            inject_lora(model, targets, preset.lora_rank, preset.lora_alpha)
            config = replace(preset.lora, seed=seed)  # batch order
            log = train_job(ws, model, ws.scenes(a, [name]), config, f"LoRA {name}")
            with stage_output(folder) as tmp:
                save_peft(
                    model, tmp, base_model_name_or_path=f"attrspace-{preset.name}-{base[:12]}"
                )
                write_json_atomic(tmp / "curve.json", curve(log))
                write_marker(tmp, "lora", expected, time.perf_counter() - start, dataset=name)
            ws.record(f"loras/{a}/{name}", "ran")
    return folders
