"""What the cached stages share: job seeds, the training job with its progress bar, the learning
curve record, the render plan and the digests later stages chain on (docs/design.md §8).

Each stage skips work whose marker holds the expected digest and whose outputs still match their
checksums (pipeline/cache.py); digests chain, so a changed upstream configuration redoes everything
that depends on it and nothing else. Each unit of work is written into a temporary folder that
replaces its stage folder in one rename (cache.stage_output), marker included.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from attrspace.data import MIXED
from attrspace.export.peft_folder import CONFIG_NAME, WEIGHTS_NAME
from attrspace.pipeline.cache import digest, file_sha256
from attrspace.pipeline.workspace import Workspace
from attrspace.train.trainer import TrainConfig, TrainLog, train


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


def lora_files_digest(folders: dict[str, list[Path]]) -> list:
    """(attribute, folder name, sha256 of the adapter weights, sha256 of adapter_config.json) of
    every LoRA, for the mine digest: the config's lora_alpha and rank shape the mined updates as
    much as the weights do."""
    return [
        (a, p.name, file_sha256(p / WEIGHTS_NAME), file_sha256(p / CONFIG_NAME))
        for a in sorted(folders)
        for p in folders[a]
    ]
