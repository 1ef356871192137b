"""The study's LoRA sets and banks.

LoRA set 0 is the LoRA stage's (OUT/loras/); set s >= 1 (OUT/study/loras/set<s>/) trains the same
datasets again with other init and batch-order seeds. Banks, all with the mined bank's K per layer
and the same IRLS: per set, the mined bank (set 0's is the mine stage's) and the pooled bank (one
consensus of all the set's LoRAs, top-K); per seed i, a shuffled-label bank mined from set
i mod lora_sets with its own shuffle (the LoRAs dealt into as many balanced groups as attributes,
every group mixing attributes) and a random orthonormal bank; the PSV bank is the mine stage's.
Seed i of every bank arm uses draw i (validation runs use draw 0), so the seed component of a
comparison carries the spread of the control's draws.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from attrspace.adapters.inject import inject_lora
from attrspace.bank import SubspaceBank
from attrspace.export.peft_folder import save_peft
from attrspace.mining.subspaces import mine, updates_from_peft
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
from attrspace.pipeline.stages.common import (
    curve,
    data_digest,
    derived_seed,
    lora_files_digest,
    train_job,
)
from attrspace.pipeline.stages.mining import bank_path, matched_random_bank, single_attribute_bank
from attrspace.pipeline.workspace import Workspace


def lora_seed(ws: Workspace, attribute: str, name: str, lora_set: int) -> int:
    """The init and batch-order seed of one attribute LoRA (set 0: the LoRA stage's seed)."""
    labels = ("lora", attribute, name) + (() if lora_set == 0 else (f"set{lora_set}",))
    return derived_seed(ws.preset.seed, *labels)


def draw_set(ws: Workspace, draw: int) -> int:
    """The LoRA set that bank draw (= seed index) `draw` is mined from."""
    return draw % ws.preset.study.lora_sets


def study_bank_path(out: Path, bank: str, lora_set: int = 0, draw: int = 0) -> Path:
    """The bank file of bank `bank` ("mined", "pooled", "shuffled", "random", "psv") for LoRA set
    `lora_set` and draw `draw`."""
    folder = Path(out) / "study" / "banks"
    if bank == "mined":
        return (
            bank_path(out, "subspace")
            if lora_set == 0
            else folder / f"set{lora_set}/mined.safetensors"
        )
    if bank == "psv":
        return bank_path(out, "psv")
    if bank == "pooled":
        return folder / f"set{lora_set}" / "pooled.safetensors"
    if bank == "shuffled":
        return folder / f"set{lora_set}" / f"shuffled{draw}.safetensors"
    if bank == "random":
        return folder / f"random{draw}.safetensors"
    raise ValueError(f"unknown study bank {bank!r}")


def arm_bank_path(ws: Workspace, bank: str, draw: int) -> Path:
    """The bank a bank arm trains with for seed (draw) `draw`."""
    return study_bank_path(ws.out, bank, draw_set(ws, draw), draw)


def shuffled_groups(labels: list[str], seed: int) -> list[str]:
    """Balanced pseudo-labels: LoRAs in attribute order (random order inside each attribute) dealt
    round-robin into len(set(labels)) groups, so every group has the same size as an attribute
    and mixes the attributes as evenly as the counts allow."""
    rng = np.random.default_rng(seed)
    names = sorted(set(labels))
    order = [i for a in names for i in rng.permutation([j for j, x in enumerate(labels) if x == a])]
    groups = [f"group{g}" for g in rng.permutation(len(names))]
    out = [""] * len(labels)
    for position, index in enumerate(order):
        out[int(index)] = groups[position % len(names)]
    return out


def flat(folders: dict[str, list[Path]]) -> tuple[list[str], list[Path]]:
    labels = [a for a in sorted(folders) for _ in folders[a]]
    paths = [p for a in sorted(folders) for p in folders[a]]
    return labels, paths


def _train_lora(
    ws: Workspace, base: str, attribute: str, name: str, lora_set: int, folder: Path, expected: str
) -> None:
    """Train and save one LoRA of set `lora_set` into `folder` (as the LoRA stage does)."""
    preset = ws.preset
    start = time.perf_counter()
    model = ws.load_base(base)
    seed = lora_seed(ws, attribute, name, lora_set)
    torch.manual_seed(seed)  # LoRA A init
    inject_lora(
        model, adaptation_targets(model, "paper-lora").lora, preset.lora_rank, preset.lora_alpha
    )
    config = replace(preset.lora, seed=seed)  # batch order
    log = train_job(ws, model, ws.scenes(attribute, [name]), config, f"LoRA set{lora_set} {name}")
    with stage_output(folder) as tmp:
        save_peft(model, tmp, base_model_name_or_path=f"attrspace-{preset.name}-{base[:12]}")
        write_json_atomic(tmp / "curve.json", curve(log))
        write_marker(tmp, "study-lora", expected, time.perf_counter() - start, dataset=name)


def lora_set_stage(ws: Workspace, base: str, lora_set: int) -> dict[str, list[Path]]:
    """LoRA set `lora_set` >= 1: every attribute dataset's LoRA again, other seeds; each LoRA is
    its own cache unit. Returns attribute -> folders."""
    preset = ws.preset
    folders: dict[str, list[Path]] = {}
    jobs = 0
    for a in preset.attributes:
        folders[a] = []
        for name in ws.dataset_names(a):
            folder = ws.out / "study" / "loras" / f"set{lora_set}" / a / name
            folders[a].append(folder)
            jobs += 1
            if spread.skip(jobs - 1):
                continue
            key = folder.relative_to(ws.out).as_posix()
            expected = digest(
                "study-lora",
                base,
                data_digest(ws, a),
                name,
                preset.lora,
                preset.lora_rank,
                preset.lora_alpha,
                lora_seed(ws, a, name, lora_set),
            )
            if is_done(folder, expected):
                ws.record(key, "cached")
                continue
            spread.claim(folder)
            clear_marker(folder)
            _train_lora(ws, base, a, name, lora_set, folder, expected)
            ws.record(key, "ran")
    return folders


def _set_banks(ws: Workspace, folders: dict[str, list[Path]], lora_set: int, layer_k, scale):
    """Mined (set >= 1) and pooled banks of one LoRA set, and the shuffled banks of its draws."""
    preset, study = ws.preset, ws.preset.study
    layers = sorted(layer_k)
    updates = updates_from_peft(folders, layers)
    banks: dict[Path, SubspaceBank] = {}
    if lora_set > 0:
        banks[study_bank_path(ws.out, "mined", lora_set)] = mine(updates, preset.mining).bank
    top = max(layer_k.values())
    labels, paths = flat(folders)
    pooled = mine(
        updates_from_peft({"pooled": paths}, layers),
        replace(preset.mining, rank=top, spectrum=max(preset.mining.spectrum, top)),
    )
    banks[study_bank_path(ws.out, "pooled", lora_set)] = single_attribute_bank(
        pooled, "pooled", layer_k, scale
    )
    groups = {}
    for draw in range(study.seeds):
        if draw_set(ws, draw) != lora_set:
            continue
        shuffle = shuffled_groups(labels, derived_seed(preset.seed, "study", "shuffle", str(draw)))
        by_group: dict[str, list[Path]] = {}
        for g, p in zip(shuffle, paths, strict=True):
            by_group.setdefault(g, []).append(p)
        mined = mine(updates_from_peft(by_group, layers), preset.mining).bank
        banks[study_bank_path(ws.out, "shuffled", lora_set, draw)] = mined
        groups[f"shuffled{draw}"] = {g: [p.name for p in ps] for g, ps in sorted(by_group.items())}
    return banks, groups


def banks_stage(ws: Workspace, sets: list[dict[str, list[Path]]], mined: str) -> str:
    """Every study bank (see the module doc) under OUT/study/banks/; returns their digest."""
    preset, study = ws.preset, ws.preset.study
    folder = ws.out / "study" / "banks"
    expected = digest(
        "study-banks",
        mined,
        [lora_files_digest(s) for s in sets],
        preset.mining,
        study.seeds,
        study.lora_sets,
        preset.seed,
    )
    if is_done(folder, expected):
        ws.record("study/banks", "cached")
        return expected
    clear_marker(folder)
    start = time.perf_counter()
    bank = SubspaceBank.load(study_bank_path(ws.out, "mined"))
    layer_k = {name: layer.rank for name, layer in bank.layers.items()}
    shapes = {name: (layer.d_out, layer.d_in) for name, layer in bank.layers.items()}
    banks: dict[Path, SubspaceBank] = {}
    groups = {}
    for lora_set, folders in enumerate(sets):
        made, shuffles = _set_banks(ws, folders, lora_set, layer_k, bank.scale)
        banks.update(made)
        groups.update(shuffles)
    for draw in range(study.seeds):
        seed = derived_seed(preset.seed, "study", "random", str(draw))
        banks[study_bank_path(ws.out, "random", 0, draw)] = matched_random_bank(
            shapes, layer_k, bank.scale, seed
        )
    for path, control in banks.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        control.save(path)
    k_total = {p: sum(layer.rank for layer in c.layers.values()) for p, c in banks.items()}
    info = {
        "K": {p.relative_to(folder).as_posix(): k for p, k in k_total.items()},
        "shuffled_groups": groups,
    }
    write_json_atomic(folder / "banks.json", info)
    write_marker(folder, "study-banks", expected, time.perf_counter() - start)
    ws.record("study/banks", "ran")
    return expected
