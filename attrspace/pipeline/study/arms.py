"""The study stage: a controlled test of the paper's claims (docs/study/protocol.md).

1. LoRA sets (banks.py): set 0 is the LoRA stage's, sets >= 1 retrain every attribute LoRA with
   other seeds.
2. banks (banks.py, OUT/study/banks/): mined and pooled per set, a shuffled and a random bank per
   seed, the PSV bank of the mine stage.
3. statistics (evidence.py, OUT/study/stats/set<s>/): gates, specificity, held-out capture,
   overlap references, the perturbation of gate G0.
4. learning rates (lr.py, OUT/study/lr/): every arm's peak lr chosen on the validation scenes.
5. arms (OUT/study/arms/<arm>/seed<i>/): every arm of StudyConfig.arms() fine-tuned at its chosen
   lr with each data-order seed; arms with the same seed see the same batches in the same order,
   so errors pair over seeds and test scenes. Seed i of a bank arm uses bank draw i.

Each bank set, statistics unit, (arm, lr) and (arm, seed) is its own cache unit (cache.py markers).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from attrspace.adapters.inject import inject, inject_lora
from attrspace.bank import SubspaceBank
from attrspace.models.vggt.params import adaptation_targets, block_linear_names
from attrspace.pipeline import spread
from attrspace.pipeline.cache import (
    clear_marker,
    digest,
    file_sha256,
    is_done,
    read_json,
    write_json_atomic,
    write_marker,
)
from attrspace.pipeline.stages.common import data_digest, derived_seed, train_job
from attrspace.pipeline.stages.evaluate import error_terms
from attrspace.pipeline.stages.finetune import prepare, training_config
from attrspace.pipeline.study.banks import arm_bank_path
from attrspace.pipeline.study.endpoints import endpoints
from attrspace.pipeline.workspace import Workspace

RECORD_FILE = "record.json"


def split_scenes(ws: Workspace) -> tuple[list[dict], list[dict], list[dict]]:
    """The study task's train, validation and test scenes (in that order in the rendered family)."""
    study = ws.preset.study
    scenes = ws.scenes(study.task)
    n_train = ws.preset.data.task_train_scenes
    train = scenes[:n_train]
    val = scenes[n_train : n_train + study.val_scenes]
    test = scenes[n_train + study.val_scenes :]
    if len(test) < 2 or len(val) < 2:
        raise ValueError(f"task {study.task!r}: the study needs >= 2 validation and test scenes")
    return train, val, test


def prepare_arm(model, ws: Workspace, arm: str, draw: int, bank_scale: float = 1.0) -> dict:
    """Make `arm`'s parameters trainable. Bank arms take draw `draw` of their bank; bank_scale
    multiplies the bank's scale (the subspace arm's way to give M its own rate, see lr.py)."""
    if arm.startswith("bank:") or arm == "subspace":
        path = arm_bank_path(ws, "mined" if arm == "subspace" else arm[5:], draw)
        bank = SubspaceBank.load(path, device=ws.device)
        inject(model, bank, scale=bank.scale * bank_scale)
        if arm == "subspace":
            heads = adaptation_targets(model, "paper-subspace").lora
            inject_lora(model, heads, ws.preset.lora_rank, ws.preset.lora_alpha)
        block_params = bank.trainable_params()
        return {"K_total": sum(x.rank for x in bank.layers.values()), "block_params": block_params}
    if arm == "block-lora":
        inject_lora(model, block_linear_names(model), ws.preset.lora_rank, ws.preset.lora_alpha)
        return {}
    return prepare(model, arm, ws)


def block_params(model) -> int:
    """Trainable parameters inside the aggregator's blocks (what rule (b) compares)."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad
        and n.startswith(("aggregator.frame_blocks.", "aggregator.global_blocks."))
    )


def fine_tune(ws, base, arm, draw, lr, heads_lr, train, data_seed, label) -> tuple:
    """Fine-tune `arm` (bank draw `draw`) at peak lr `lr` with batch order `data_seed`. The subspace
    arm trains at the heads' rate with its bank scaled by lr / heads_lr: Adam's steps do not
    depend on the gradient's scale, so M moves as if trained at `lr` (weight decay aside)."""
    preset = ws.preset
    model = ws.load_base(base)
    torch.manual_seed(derived_seed(preset.seed, "study", preset.study.task, arm, label))
    scale, train_lr = 1.0, lr
    if arm == "subspace":
        scale, train_lr = lr / heads_lr, heads_lr
    record = prepare_arm(model, ws, arm, draw, scale)
    record.setdefault("block_params", block_params(model))
    config = replace(training_config(preset, arm, train_lr), seed=data_seed)
    log = train_job(ws, model, train, config, f"{arm} {label}")
    record.update(
        lr=lr,
        heads_lr=heads_lr if arm == "subspace" else None,
        steps=config.steps,
        trainable_params=log.trainable_params,
        step_ms=log.step_ms,
        objective=log.losses,
    )
    return model, record


def run_arm(ws, base, arm, seed, lr, heads_lr, train, test) -> dict:
    """Fine-tune one arm with data-order seed index `seed` and evaluate it on the test scenes."""
    preset = ws.preset
    record: dict = {"arm": arm, "seed": seed, "steps": 0, "trainable_params": 0, "block_params": 0}
    if arm == "zero-shot":
        model = ws.load_base(base)
    else:
        data_seed = derived_seed(preset.seed, "study", preset.study.task, "data", str(seed))
        try:
            model, facts = fine_tune(ws, base, arm, seed, lr, heads_lr, train, data_seed, str(seed))
        except FloatingPointError as exc:
            return {**record, "status": "diverged", "error": str(exc)}
        record.update(facts)
    record["test_error"] = error_terms(model, test, ws.device)
    try:
        record["endpoints"] = endpoints(
            model, test, ws.device, preset.study.endpoint_points, preset.seed
        )
    except (FloatingPointError, ValueError) as exc:
        return {**record, "status": "failed evaluation", "error": str(exc)}
    record["status"] = "ok"
    return record


def arm_digest(ws: Workspace, base: str, arm: str, seed: int, banks: str, rates: dict) -> str:
    preset = ws.preset
    bank = None
    if arm.startswith("bank:") or arm == "subspace":
        bank = file_sha256(arm_bank_path(ws, "mined" if arm == "subspace" else arm[5:], seed))
    return digest(
        "study-arm",
        arm,
        seed,
        base,
        banks,
        data_digest(ws, preset.study.task),
        preset.study,
        preset.data.task_train_scenes,
        preset.finetune if arm != "zero-shot" else None,
        rates.get(arm),
        rates.get("heads") if arm == "subspace" else None,
        preset.lora_rank,
        preset.lora_alpha,
        preset.seed,
        bank,
    )


def arms_stage(ws: Workspace, base: str, banks: str, rates: dict) -> dict[str, list[dict]]:
    """Every arm x seed at its chosen rate (zero-shot once: nothing of it depends on a seed)."""
    train, _, test = split_scenes(ws)
    out: dict[str, list[dict]] = {}
    jobs = 0
    for arm in ws.preset.study.arms():
        out[arm] = []
        for seed in range(1 if arm == "zero-shot" else ws.preset.study.seeds):
            jobs += 1
            if spread.skip(jobs - 1):  # another rank's job under torchrun
                continue
            folder = ws.out / "study" / "arms" / arm.replace(":", "_") / f"seed{seed}"
            expected = arm_digest(ws, base, arm, seed, banks, rates)
            key = folder.relative_to(ws.out).as_posix()
            if is_done(folder, expected):
                ws.record(key, "cached")
                out[arm].append(read_json(folder / RECORD_FILE, ("arm", "seed", "status")))
                continue
            spread.claim(folder)
            clear_marker(folder)
            start = time.perf_counter()
            record = run_arm(ws, base, arm, seed, rates.get(arm), rates.get("heads"), train, test)
            write_json_atomic(folder / RECORD_FILE, record)
            write_marker(
                folder, "study-arm", expected, time.perf_counter() - start, status=record["status"]
            )
            ws.record(key, "ran")
            out[arm].append(record)
    return out
