"""The stages before fine-tuning: render the families, pre-train the base model, train one LoRA per
attribute dataset, mine the bank (and the control banks of the comparison).

Each stage skips work whose marker holds the expected digest and whose outputs still match their
checksums (see cache.py); digests chain, so a changed upstream configuration redoes everything that
depends on it and nothing else. Each unit of work is written into a temporary folder that replaces
its stage folder in one rename (cache.stage_output), marker included.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path

import torch

from attrspace.data import MIXED, write_family
from attrspace.inject import inject_lora
from attrspace.models.vggt.params import adaptation_targets
from attrspace.peft_io import CONFIG_NAME, WEIGHTS_NAME, save_peft
from attrspace.train.trainer import TrainConfig, TrainLog, train

from . import ranks
from ._io import save_weights
from .cache import (
    clear_marker,
    digest,
    file_sha256,
    is_done,
    stage_output,
    write_json_atomic,
    write_marker,
)
from .evaluate import error_terms
from .workspace import Workspace


def derived_seed(seed: int, *labels: str) -> int:
    """A seed for one job, stable across runs and independent of the order jobs run in."""
    text = "/".join([str(seed), *labels]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") & 0x7FFFFFFF


def train_job(ws: Workspace, model, scenes: list[dict], config: TrainConfig, desc: str) -> TrainLog:
    """`train` with a progress bar showing the step and the objective."""
    with ws.bar(config.steps, desc) as bar:

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(objective=f"{loss:.3f}")

        return train(model, scenes, config, progress)


def curve(log: TrainLog) -> dict:
    return {
        "objective": log.losses,
        "seconds": log.seconds,
        "step_ms": log.step_ms,
        "trainable_params": log.trainable_params,
    }


# -- render ---------------------------------------------------------------------------------------


def family_plan(ws: Workspace) -> dict[str, tuple[int, int]]:
    """family -> (datasets, scenes per dataset) this run needs."""
    data = ws.preset.data
    plan = {}
    if not ws.preset.needs_checkpoint:
        plan[MIXED] = (data.pretrain_datasets, data.pretrain_scenes)
    if ws.loras_dir is None:
        for a in ws.preset.attributes:
            plan[a] = (data.loras_per_attribute, data.lora_scenes)
    for task in ws.preset.tasks:
        plan[task] = (1, data.task_train_scenes + data.task_test_scenes)
    return plan


def content_streams(ws: Workspace, family: str) -> int:
    """Content streams of `family` (data/families.py; 1 = the family's own, and for every family
    that is not an attribute family)."""
    return ws.preset.data.content_streams if family in ws.preset.attributes else 1


def data_digest(ws: Workspace, family: str) -> str:
    n, scenes = family_plan(ws)[family]
    data = ws.preset.data
    streams = content_streams(ws, family)
    extra = () if streams == 1 else (streams,)  # digests of earlier runs stay valid
    return digest("data", family, n, scenes, data.views, data.image_size, ws.preset.seed, *extra)


def render_stage(ws: Workspace) -> dict[str, str]:
    """Render every family of the plan into OUT/data/<family>/; returns family -> digest."""
    out = {}
    data = ws.preset.data
    for family, (n, scenes) in family_plan(ws).items():
        folder = ws.family_dir(family)
        expected = data_digest(ws, family)
        out[family] = expected
        if is_done(folder, expected):
            ws.record(f"data/{family}", "cached")
            continue
        clear_marker(folder)
        start = time.perf_counter()
        with ws.bar(n * scenes, f"render {family}") as bar, stage_output(folder) as tmp:
            write_family(
                tmp,
                family,
                n,
                scenes,
                data.views,
                data.image_size,
                ws.preset.seed,
                on_scene=lambda: bar.update(1),
                threads=ws.preset.threads or None,
                content_streams=content_streams(ws, family),
            )
            seconds = time.perf_counter() - start
            write_marker(tmp, "data", expected, seconds, family=family, scenes=n * scenes)
        ws.record(f"data/{family}", "ran")
    return out


# -- pre-training ---------------------------------------------------------------------------------


def base_digest(ws: Workspace) -> str:
    if ws.preset.needs_checkpoint:
        return digest("base-checkpoint", ws.checkpoint_identity(), ws.preset.model)
    return digest(
        "base", ws.preset.model, data_digest(ws, MIXED), ws.preset.pretrain, ws.preset.seed
    )


def pretrain_stage(ws: Workspace) -> str:
    """Pre-train the model from scratch on the mixed family (OUT/base/), or take the checkpoint.
    Returns the base digest."""
    folder = ws.out / "base"
    expected = base_digest(ws)
    if is_done(folder, expected):
        ws.record("base", "cached")
        return expected
    clear_marker(folder)
    start = time.perf_counter()
    if ws.preset.needs_checkpoint:
        ws.load_base()  # validates every key and shape of the checkpoint once
        write_marker(
            folder, "base", expected, time.perf_counter() - start, checkpoint=str(ws.checkpoint)
        )
        ws.record("base", "ran")
        return expected
    scenes = ws.scenes(MIXED)
    model = ws.new_model()
    log = train_job(ws, model, scenes, ws.preset.pretrain, "pretrain")
    errors = error_terms(model, scenes[:16], ws.device)
    with stage_output(folder) as tmp:
        save_weights(model, tmp / "model.safetensors", expected)
        write_json_atomic(tmp / "curve.json", {**curve(log), "train_error": errors})
        write_marker(
            tmp,
            "base",
            expected,
            time.perf_counter() - start,
            steps=ws.preset.pretrain.steps,
            scenes=len(scenes),
            train_error=errors["error"],
        )
    ws.record("base", "ran")
    return expected


# -- attribute LoRAs ------------------------------------------------------------------------------


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
            if ranks.skip(jobs - 1):  # another rank's job under torchrun
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
            ranks.claim(folder)
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


def lora_files_digest(folders: dict[str, list[Path]]) -> list:
    """(attribute, folder name, sha256 of the adapter weights, sha256 of adapter_config.json) of
    every LoRA, for the mine digest: the config's lora_alpha and rank shape the mined updates as
    much as the weights do."""
    return [
        (a, p.name, file_sha256(p / WEIGHTS_NAME), file_sha256(p / CONFIG_NAME))
        for a in sorted(folders)
        for p in folders[a]
    ]
