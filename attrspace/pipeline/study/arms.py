"""The study stage: a controlled test of the paper's claims on the run's LoRAs and mined bank.

1. banks (OUT/study/banks/): controls with the mined bank's K per layer and the same IRLS: a
   shuffled-label bank (the LoRAs dealt into as many groups as there are attributes, each group
   holding LoRAs of every attribute, then mined as if the groups were attributes), a pooled bank
   (one consensus of all LoRAs, its top-K directions) and `random_banks` random orthonormal banks;
   PSV and single-attribute come from the mine stage.
2. statistics (OUT/study/stats.json): per LoRA and block linear how far A moved from its init and
   how much of the update the init's row space explains (the gates); cosine similarity of the
   updates within vs between attributes with a permutation p-value; the share of each held-out
   LoRA's update captured by its own attribute's subspace (mined without it) and by the others'.
3. arms (OUT/study/arms/<arm>/seed<i>/): every arm of StudyConfig.arms() fine-tuned with each
   data-order seed on the study task; arms with the same seed see the same batches in the same
   order, so errors pair over seeds and test scenes.

Each bank set, the statistics and every (arm, seed) is its own cache unit (cache.py markers).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from attrspace.bank import SubspaceBank
from attrspace.inject import inject, inject_lora
from attrspace.mine import mine, updates_from_peft
from attrspace.models.vggt.params import adaptation_targets, block_linear_names
from attrspace.peft_io import WEIGHTS_NAME, load_peft, lora_state

from . import ranks
from . import study_stats as st
from .cache import (
    clear_marker,
    digest,
    file_sha256,
    is_done,
    read_json,
    write_json_atomic,
    write_marker,
)
from .evaluate import error_terms, test_metrics
from .finetune import prepare, training_config
from .mining import bank_path, matched_random_bank, single_attribute_bank
from .stages import data_digest, derived_seed, lora_files_digest, train_job
from .workspace import Workspace

STATS_FILE = "stats.json"
RECORD_FILE = "record.json"


def study_bank_path(out: Path, bank: str) -> Path:
    """The bank file of a bank-only arm ("mined", "psv", "single" are the mine stage's)."""
    if bank == "mined":
        return bank_path(out, "subspace")
    if bank in ("psv", "single"):
        return bank_path(out, bank)
    return out / "study" / "banks" / f"{bank}.safetensors"


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


def _flat(folders: dict[str, list[Path]]) -> tuple[list[str], list[Path]]:
    labels = [a for a in sorted(folders) for _ in folders[a]]
    paths = [p for a in sorted(folders) for p in folders[a]]
    return labels, paths


def banks_stage(ws: Workspace, base: str, folders: dict[str, list[Path]], mined: str) -> str:
    """The shuffled, pooled and random control banks (OUT/study/banks/); returns their digest."""
    preset, study = ws.preset, ws.preset.study
    folder = ws.out / "study" / "banks"
    expected = digest(
        "study-banks", mined, lora_files_digest(folders), preset.mining, study, preset.seed
    )
    if is_done(folder, expected):
        ws.record("study/banks", "cached")
        return expected
    clear_marker(folder)
    start = time.perf_counter()
    bank = SubspaceBank.load(study_bank_path(ws.out, "mined"))
    layer_k = {name: layer.rank for name, layer in bank.layers.items()}
    shapes = {name: (layer.d_out, layer.d_in) for name, layer in bank.layers.items()}
    layers = sorted(layer_k)
    labels, paths = _flat(folders)
    groups = shuffled_groups(labels, derived_seed(preset.seed, "study", "shuffle"))
    by_group: dict[str, list[Path]] = {}
    for g, p in zip(groups, paths, strict=True):
        by_group.setdefault(g, []).append(p)
    banks = {"shuffled": mine(updates_from_peft(by_group, layers), preset.mining).bank}
    top = max(layer_k.values())
    pooled = mine(
        updates_from_peft({"pooled": paths}, layers),
        replace(preset.mining, rank=top, spectrum=max(preset.mining.spectrum, top)),
    )
    banks["pooled"] = single_attribute_bank(pooled, "pooled", layer_k, bank.scale)
    for i in range(study.random_banks):
        seed = derived_seed(preset.seed, "study", "random", str(i))
        banks[f"random{i}"] = matched_random_bank(shapes, layer_k, bank.scale, seed)
    for name, control in banks.items():
        control.save(study_bank_path(ws.out, name))
    info = {
        "K": {n: {k: v.rank for k, v in b.layers.items()} for n, b in banks.items()},
        "shuffled_groups": {g: [p.name for p in ps] for g, ps in sorted(by_group.items())},
        "shuffled_labels": dict(zip([p.name for p in paths], groups, strict=True)),
    }
    write_json_atomic(folder / "banks.json", info)
    write_marker(folder, "study-banks", expected, time.perf_counter() - start)
    ws.record("study/banks", "ran")
    return expected


def initial_A(ws: Workspace, base: str, attribute: str, name: str) -> dict[str, torch.Tensor]:
    """A of every LoRA layer right after injection, as the LoRA stage initialised it (same seed,
    same targets, same order)."""
    preset = ws.preset
    model = ws.load_base(base)
    torch.manual_seed(derived_seed(preset.seed, "lora", attribute, name))
    inject_lora(
        model, adaptation_targets(model, "paper-lora").lora, preset.lora_rank, preset.lora_alpha
    )
    return {k: f.A.detach().cpu() for k, f in lora_state(model).items()}


def stats_stage(ws: Workspace, base: str, folders: dict[str, list[Path]]) -> str:
    """OUT/study/stats.json: gates, specificity and held-out capture; returns its digest."""
    preset, study = ws.preset, ws.preset.study
    folder = ws.out / "study" / "stats"
    expected = digest(
        "study-stats",
        base,
        lora_files_digest(folders),
        preset.mining,
        preset.lora_rank,
        preset.lora_alpha,
        study,
        preset.seed,
    )
    if is_done(folder, expected):
        ws.record("study/stats", "cached")
        return expected
    clear_marker(folder)
    start = time.perf_counter()
    layers = block_linear_names(ws.load_base(base))
    labels, paths = _flat(folders)
    factors = [load_peft(p) for p in paths]
    if not factors or any(set(layers) - set(f) for f in factors):
        raise ValueError(f"{ws.out / 'loras'}: some LoRA lacks a block linear of {layers[:3]}...")
    # Gates: does each LoRA's A leave its initialisation?
    movement: dict[str, dict[str, list[float]]] = {}
    for a, p, f in zip(labels, paths, factors, strict=True):
        a0 = initial_A(ws, base, a, p.name)
        entry = movement.setdefault(a, {"rel_change": [], "init_energy": []})
        for name in layers:
            m = st.lora_movement(f[name].A, a0[name], f[name].B)
            entry["rel_change"].append(m["rel_change"])
            entry["init_energy"].append(m["init_energy"])
    gates = {
        a: {
            "median_rel_change": st.median(v["rel_change"]),
            "median_init_energy": st.median(v["init_energy"]),
        }
        for a, v in movement.items()
    }
    # Specificity of the updates.
    pairs = [{n: f[n].left_right() for n in layers} for f in factors]
    sim = st.similarity_matrix(pairs, layers)
    test = st.specificity_test(
        sim, labels, study.permutations, derived_seed(preset.seed, "study", "perm")
    )
    # Held-out capture: LoRA i against its attribute mined without it and the others mined whole.
    updates = updates_from_peft(folders, layers)
    full = mine(updates, preset.mining)
    generator = torch.Generator().manual_seed(derived_seed(preset.seed, "study", "capture"))
    held = []
    for a in sorted(folders):
        for i, p in enumerate(folders[a]):
            rest = {n: [u for j, u in enumerate(updates[a][n]) if j != i] for n in layers}
            if not all(rest.values()):
                raise ValueError(f"attribute {a!r}: held-out capture needs >= 2 LoRAs")
            loo = mine({a: rest}, preset.mining)
            row = {"lora": p.name, "attribute": a, "capture": {}, "random": 0.0}
            for b in sorted(folders):
                source = loo if b == a else full
                values = []
                for n in layers:
                    u, _, v = source.bases[n][b]
                    values.append(st.capture(updates[a][n][i], u, v))
                row["capture"][b] = float(np.mean(values))
            u_dim = {n: loo.bases[n][a][0].shape for n in layers}
            row["random"] = float(
                np.mean(
                    [
                        st.capture(
                            updates[a][n][i],
                            st.random_orthonormal(u_dim[n][0], u_dim[n][1], generator),
                            st.random_orthonormal(
                                updates[a][n][i][1].shape[0], u_dim[n][1], generator
                            ),
                        )
                        for n in layers
                    ]
                )
            )
            held.append(row)
    wins = [
        r["capture"][r["attribute"]]
        > max(v for b, v in r["capture"].items() if b != r["attribute"])
        for r in held
    ]
    stats = {
        "layers": layers,
        "labels": labels,
        "loras": [p.name for p in paths],
        "gates": gates,
        "movement": movement,
        "similarity": sim.tolist(),
        "specificity": test,
        "held_out": held,
        "own_capture_wins": float(np.mean(wins)),
    }
    write_json_atomic(folder / STATS_FILE, stats)
    write_marker(folder, "study-stats", expected, time.perf_counter() - start)
    ws.record("study/stats", "ran")
    return expected


def _prepare_arm(model, arm: str, ws: Workspace) -> dict:
    if arm.startswith("bank:"):
        bank = SubspaceBank.load(study_bank_path(ws.out, arm[5:]), device=ws.device)
        inject(model, bank)
        ks = [layer.rank for layer in bank.layers.values()]
        return {"K_total": sum(ks), "bank_params": bank.trainable_params()}
    return prepare(model, arm, ws)


def _arm_config(ws: Workspace, arm: str):
    return training_config(ws.preset, "subspace" if arm.startswith("bank:") else arm)


def arm_digest(ws: Workspace, base: str, arm: str, seed: int, banks: str) -> str:
    preset = ws.preset
    task = preset.study.task
    bank = None
    if arm.startswith("bank:"):
        bank = file_sha256(study_bank_path(ws.out, arm[5:]))
    elif arm in ("subspace",):
        bank = file_sha256(bank_path(ws.out, "subspace"))
    return digest(
        "study-arm",
        arm,
        seed,
        base,
        banks,
        data_digest(ws, task),
        task,
        preset.data.task_train_scenes,
        _arm_config(ws, arm) if arm != "zero-shot" else None,
        preset.lora_rank,
        preset.lora_alpha,
        preset.eval_points,
        preset.seed,
        bank,
    )


def run_arm(ws: Workspace, base: str, arm: str, seed: int, train_scenes, test_scenes) -> dict:
    """Fine-tune one arm with data-order seed index `seed` and evaluate it on the test scenes."""
    preset, task = ws.preset, ws.preset.study.task
    model = ws.load_base(base)
    record: dict = {"arm": arm, "seed": seed, "steps": 0, "trainable_params": 0}
    if arm != "zero-shot":
        torch.manual_seed(derived_seed(preset.seed, "study", task, arm, str(seed)))  # adapter init
        record.update(_prepare_arm(model, arm, ws))
        config = replace(
            _arm_config(ws, arm), seed=derived_seed(preset.seed, "study", task, "data", str(seed))
        )
        try:
            log = train_job(ws, model, train_scenes, config, f"{arm} seed {seed}")
        except FloatingPointError as exc:
            return {**record, "status": "diverged", "error": str(exc)}
        record.update(
            steps=config.steps,
            lr=config.lr,
            trainable_params=log.trainable_params,
            step_ms=log.step_ms,
            objective=log.losses,
        )
    record["test_error"] = error_terms(model, test_scenes, ws.device)
    try:
        record["test"] = test_metrics(
            model, test_scenes, ws.device, preset.eval_points, preset.seed
        )
    except (FloatingPointError, ValueError) as exc:
        return {**record, "status": "failed evaluation", "error": str(exc)}
    record["status"] = "ok"
    return record


def arms_stage(ws: Workspace, base: str, banks: str) -> dict[str, list[dict]]:
    """Every arm x seed (zero-shot once: nothing of it depends on a seed)."""
    preset, study = ws.preset, ws.preset.study
    scenes = ws.scenes(study.task)
    n_train = preset.data.task_train_scenes
    train_scenes, test_scenes = scenes[:n_train], scenes[n_train:]
    if len(test_scenes) < 2:
        raise ValueError(
            f"task {study.task!r}: the study needs >= 2 test scenes, got {len(test_scenes)}"
        )
    out: dict[str, list[dict]] = {}
    jobs = 0
    for arm in study.arms():
        out[arm] = []
        for seed in range(1 if arm == "zero-shot" else study.seeds):
            jobs += 1
            if ranks.skip(jobs - 1):  # another rank's job under torchrun
                continue
            folder = ws.out / "study" / "arms" / arm.replace(":", "_") / f"seed{seed}"
            expected = arm_digest(ws, base, arm, seed, banks)
            key = folder.relative_to(ws.out).as_posix()
            if is_done(folder, expected):
                ws.record(key, "cached")
                out[arm].append(read_json(folder / RECORD_FILE, ("arm", "seed", "status")))
                continue
            ranks.claim(folder)
            clear_marker(folder)
            start = time.perf_counter()
            record = run_arm(ws, base, arm, seed, train_scenes, test_scenes)
            write_json_atomic(folder / RECORD_FILE, record)
            write_marker(
                folder, "study-arm", expected, time.perf_counter() - start, status=record["status"]
            )
            ws.record(key, "ran")
            out[arm].append(record)
    return out


def study_stage(ws: Workspace, base: str, folders: dict[str, list[Path]], mined: str) -> dict:
    """Control banks, statistics and every fine-tuning arm of the study (see the module doc)."""
    if ws.preset.study is None:
        raise ValueError(f"preset {ws.preset.name!r} defines no study")
    missing = [a for a, ps in folders.items() for p in ps if not (p / WEIGHTS_NAME).is_file()]
    if missing:
        raise ValueError(f"LoRA weights missing for attributes {sorted(set(missing))}")
    # Called on every rank under torchrun: one-job parts on rank 0, the arms spread over the ranks.
    banks = ranks.run_on_leader(banks_stage, ws, base, folders, mined)
    stats = ranks.run_on_leader(stats_stage, ws, base, folders)
    arms = ranks.run_spread(arms_stage, ws, base, banks)
    return {"banks": banks, "stats": stats, "arms": arms}
