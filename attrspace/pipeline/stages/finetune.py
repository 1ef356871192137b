"""Fine-tuning on the held-out downstream tasks: one trainer, the same steps and lr schedule for
every method, evaluated on the task's test scenes.

Methods (parameter sets from attrspace.models.vggt.params):
- zero-shot: the base model, evaluated as is;
- full: every "paper-full" parameter (blocks, camera/register tokens, both heads) at `full_lr`;
- lora: LoRA of rank r on the "paper-lora" layers (block linears + head linears/convs);
- subspace: the mined bank on the block linears (only M trains) + LoRA r on the heads (the paper);
- psv, random, single: the same as subspace with a control bank (see mining.py);
- heads: LoRA r on the heads only, no block adapter: the part every bank method shares, so the
  difference to it is what a bank adds.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from attrspace.adapters.inject import inject, inject_lora
from attrspace.bank import SubspaceBank
from attrspace.export.writers import export_peft
from attrspace.measure.profiling import saved_activation_bytes
from attrspace.models.vggt.params import adaptation_targets
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
from attrspace.pipeline.presets import Preset, preset_defaults
from attrspace.pipeline.stages.common import curve, data_digest, derived_seed, train_job
from attrspace.pipeline.stages.evaluate import error_terms, test_metrics
from attrspace.pipeline.stages.mining import bank_path
from attrspace.pipeline.workspace import Workspace
from attrspace.train.config import save_config
from attrspace.train.losses import vggt_loss
from attrspace.train.trainer import TrainConfig, collate
from attrspace.util.files import atomic_save_safetensors

BANK_METHODS = ("subspace", "psv", "random", "single")
ADAPTER_DIR = "adapter"
TRAINED_FILE = "trained.safetensors"
# Part of every trained method's digest: folders cached before the weights were saved (metrics
# and curves only) are redone once.
OUTPUTS = "weights+adapter"


def training_config(preset: Preset, method: str, lr: float | None = None) -> TrainConfig:
    """The shared fine-tuning setting; full fine-tuning swaps in its own peak lr, and a given `lr`
    (the study's per-arm rate, chosen on validation scenes) replaces either."""
    if lr is not None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        return replace(preset.finetune, lr=lr)
    return replace(preset.finetune, lr=preset.full_lr) if method == "full" else preset.finetune


def prepare(model: nn.Module, method: str, ws: Workspace) -> dict:
    """Make `method`'s parameters (and only those) trainable in `model`; returns facts for the
    report (K per layer for bank methods)."""
    preset = ws.preset
    if method == "full":
        targets = set(adaptation_targets(model, "paper-full").full)
        for name, p in model.named_parameters():
            p.requires_grad_(name in targets)
        return {}
    if method == "lora":
        targets = adaptation_targets(model, "paper-lora").lora
        inject_lora(model, targets, preset.lora_rank, preset.lora_alpha)
        return {}
    if method == "heads":
        heads = adaptation_targets(model, "paper-subspace").lora
        inject_lora(model, heads, preset.lora_rank, preset.lora_alpha)
        return {}
    if method in BANK_METHODS:
        bank = SubspaceBank.load(bank_path(ws.out, method), device=ws.device)
        inject(model, bank)
        heads = adaptation_targets(model, "paper-subspace").lora
        inject_lora(model, heads, preset.lora_rank, preset.lora_alpha)
        ks = [layer.rank for layer in bank.layers.values()]
        return {
            "K_total": sum(ks),
            "K_mean": sum(ks) / len(ks),
            "bank_params": bank.trainable_params(),
            "bank_attributes": list(bank.attributes),
        }
    raise ValueError(f"method {method!r} cannot be prepared for training")


def save_trained(model: nn.Module, folder: Path, method: str, ws: Workspace) -> None:
    """What a method trained, in `folder`: adapter/ (a plain peft folder; adapter methods),
    trained.safetensors (every trained tensor by parameter name: M, LoRA factors, or the full
    method's parameters) and config.toml (the fine-tuning setting, as `attrspace config` prints
    it)."""
    if method != "full":
        export_peft(
            model, folder / ADAPTER_DIR, base_model_name_or_path=f"attrspace-{ws.preset.name}"
        )
    tensors = {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }
    atomic_save_safetensors(tensors, {"method": method}, folder / TRAINED_FILE)
    save_config(preset_defaults(ws.preset), folder / "config.toml", header=f"{method} settings")


def _activation_bytes(model: nn.Module, scenes: list[dict], batch_size: int, device) -> int:
    """Bytes autograd saves for the backward of one training step (model weights excluded)."""
    batch = {k: v.to(device) for k, v in collate(scenes[:batch_size]).items()}
    model.train()
    return saved_activation_bytes(
        model, lambda: vggt_loss(model(batch["images"]), batch)["objective"]
    )


def run_method(
    ws: Workspace,
    base: str,
    task: str,
    method: str,
    train_scenes: list[dict],
    test_scenes: list[dict],
    folder: Path,
) -> dict:
    """Fine-tune (unless zero-shot) and evaluate one method on one task -> the metrics record;
    a trained method's weights go into `folder` (save_trained)."""
    preset, device = ws.preset, ws.device
    # Every method sees the same batches in the same order; only the adapter init seed differs.
    data_seed = derived_seed(preset.seed, "finetune", task)
    model = ws.load_base(base)
    record: dict = {"task": task, "method": method, "steps": 0, "lr": None}
    if method != "zero-shot":
        torch.manual_seed(derived_seed(preset.seed, "finetune", task, method))  # LoRA init
        record.update(prepare(model, method, ws))
        config = replace(training_config(preset, method), seed=data_seed)
        record.update(steps=config.steps, lr=config.lr)
        record["saved_activation_bytes"] = _activation_bytes(
            model, train_scenes, config.batch_size, device
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            log = train_job(ws, model, train_scenes, config, f"{task} {method}")
        except FloatingPointError as exc:
            record.update(status="diverged", error=str(exc))
            return record
        record["curve"] = curve(log)
        save_trained(model, folder, method, ws)
        record.update(
            trainable_params=log.trainable_params, step_ms=log.step_ms, train_seconds=log.seconds
        )
        if device.type == "cuda":
            record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        record["trainable_params"] = 0
    record["train_error"] = error_terms(model, train_scenes, device)
    record["test_error"] = error_terms(model, test_scenes, device)
    try:
        record["test"] = test_metrics(model, test_scenes, device, preset.eval_points, preset.seed)
    except (FloatingPointError, ValueError) as exc:
        record.update(status="failed evaluation", error=str(exc))
        return record
    record["status"] = "ok"
    return record


def method_digest(ws: Workspace, base: str, mine: str | None, task: str, method: str) -> str:
    preset = ws.preset
    # The train/test split of the task's scenes shapes both the training and the test metrics.
    split = preset.data.task_train_scenes
    evaluation = ("eval", base, data_digest(ws, task), task, split, preset.seed, preset.eval_points)
    if method == "zero-shot":  # nothing trains: only the base model and the test data matter
        return digest("finetune", method, evaluation)
    bank = None
    if method in BANK_METHODS:
        bank = (mine, file_sha256(bank_path(ws.out, method)))
    training = (
        OUTPUTS,
        training_config(preset, method),
        preset.lora_rank if method != "full" else None,
        preset.lora_alpha if method != "full" else None,
    )
    return digest("finetune", method, evaluation, training, bank)


def finetune_stage(ws: Workspace, base: str, mine: str | None) -> dict[str, dict[str, dict]]:
    """Every method on every task -> OUT/finetune/<task>/<method>/metrics.json. Returns the records
    by task and method. Bank methods need the mine stage's output (mine digest)."""
    preset = ws.preset
    n_train = preset.data.task_train_scenes
    results: dict[str, dict[str, dict]] = {}
    jobs = 0
    for task in preset.tasks:
        scenes = ws.scenes(task)
        train_scenes, test_scenes = scenes[:n_train], scenes[n_train:]
        results[task] = {}
        for method in preset.methods:
            jobs += 1
            if method in BANK_METHODS and mine is None:
                raise ValueError(f"method {method!r} needs the mine stage's banks")
            if method == "single" and not bank_path(ws.out, "single").exists():
                raise ValueError(
                    f"no single-attribute bank in {bank_path(ws.out, 'single').parent}: "
                    f"the LoRAs have no attribute {preset.single_attribute!r}"
                )
            if spread.skip(jobs - 1):  # another rank's job under torchrun
                continue
            folder = ws.out / "finetune" / task / method
            expected = method_digest(ws, base, mine, task, method)
            if is_done(folder, expected):
                ws.record(f"finetune/{task}/{method}", "cached")
                results[task][method] = read_json(folder / "metrics.json", ("status",))
                continue
            spread.claim(folder)
            clear_marker(folder)
            start = time.perf_counter()
            record = run_method(ws, base, task, method, train_scenes, test_scenes, folder)
            curve_data = record.pop("curve", None)
            if curve_data is not None:
                write_json_atomic(folder / "curve.json", curve_data)
            else:  # zero-shot, or a run that diverged: no curve of an earlier run may stay
                (folder / "curve.json").unlink(missing_ok=True)
            write_json_atomic(folder / "metrics.json", record)
            write_marker(
                folder, "finetune", expected, time.perf_counter() - start, status=record["status"]
            )
            ws.record(f"finetune/{task}/{method}", "ran")
            results[task][method] = record
    return results
