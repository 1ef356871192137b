"""A fine-tuning loop that can be stopped at any step and continued exactly (docs/design.md §8).

One AdamW with a parameter group per kind of trainable tensor (the bank's M, LoRA factors, plain
parameters; learning rates from `FinetuneConfig.optim`), the peak lr times a warm-up and decay
factor set before every step, gradient-norm clipping, optional bf16 autocast, a validation pass
at the configured cadence. The batch of step k is a function of (seed, k) alone (a seeded
permutation per epoch), so a run that restarts at step k draws exactly the batches it would have.

The resumable state is one safetensors file: every trainable tensor, AdamW's moments and step
counts, torch's RNG state, and in its metadata the step reached, the history so far and the
digest of the run's configuration. `save_state` writes it atomically; `load_state` validates
every tensor name, shape and dtype and the digest before it changes the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from attrspace.adapters.nn import LoRAConv2d, LoRALinear, SubspaceLinear
from attrspace.data.folder import hash_seed
from attrspace.train.config import FinetuneConfig
from attrspace.train.losses import vggt_loss
from attrspace.train.trainer import collate, evaluate_loss
from attrspace.util.files import atomic_save_safetensors, parse_json, read_safetensors

STATE_KEY = "attrspace_finetune_state"
STATE_VERSION = 1
GROUPS = ("m", "lora", "full")


class StateFileError(ValueError):
    """A resumable state that cannot be read back or belongs to another run."""


@dataclass
class History:
    """Objective per step, validation records ({"step", "objective"}), seconds trained."""

    losses: list[float] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"losses": self.losses, "validation": self.validation, "seconds": self.seconds}


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by group: "m" (SubspaceLinear.M), "lora" (LoRA factors), "full"
    (everything else that requires grad), each in the model's parameter order."""
    kind: dict[int, str] = {}
    for m in model.modules():
        if isinstance(m, SubspaceLinear):
            kind[id(m.M)] = "m"
        elif isinstance(m, (LoRALinear, LoRAConv2d)):
            for p in (*m.lora_A.parameters(), *m.lora_B.parameters()):
                kind[id(p)] = "lora"
    groups: dict[str, list] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[kind.get(id(p), "full")].append((name, p))
    return groups


def build_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.AdamW:
    o = config.optim
    peak = {"m": o.lr_m, "lora": o.lr_lora, "full": o.lr_full}
    groups = [
        {"params": [p for _, p in named], "lr": peak[g], "peak": peak[g], "name": g}
        for g, named in param_groups(model).items()
        if named
    ]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, weight_decay=o.weight_decay)


def total_steps(config: FinetuneConfig, n_train: int) -> int:
    """train.steps, or train.epochs passes over n_train samples (at least one step)."""
    t = config.train
    if t.epochs <= 0:
        return t.steps
    return max(1, math.ceil(t.epochs * max(1, n_train // t.batch_size)))


def lr_factor(step: int, total: int, config: FinetuneConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then the schedule."""
    o = config.optim
    warm = max(1, round(o.warmup * total))
    if step < warm:
        return (step + 1) / warm
    if o.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    low = o.final_lr_ratio
    if o.schedule == "linear":
        return 1 - (1 - low) * progress
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The sample indices of batch `step`: epoch e = step // (n // batch_size) draws a
    permutation seeded by (seed, e); a tail shorter than a batch is left out."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(hash_seed(seed, epoch)))
    return order[pos * batch_size : (pos + 1) * batch_size].tolist()


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def validate(model: nn.Module, val_set, config: FinetuneConfig) -> float:
    """Mean objective over the validation samples (the first max_samples, or all)."""
    limit = config.validation.max_samples or None
    try:
        return evaluate_loss(model, val_set, config.loss, limit)
    finally:
        model.train()


def save_state(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    history: History,
    digest: str,
) -> None:
    """Write the resumable state after `step` steps (atomically; see the module docstring)."""
    tensors: dict[str, Tensor] = {"rng/torch": torch.get_rng_state()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            tensors[f"param/{name}"] = p.detach().cpu().contiguous()
            for key, value in opt.state.get(p, {}).items():
                tensors[f"adam/{name}/{key}"] = value.detach().cpu().reshape(-1).contiguous()
    meta = {"version": STATE_VERSION, "step": step, "digest": digest, "history": history.to_json()}
    atomic_save_safetensors(tensors, {STATE_KEY: json.dumps(meta)}, Path(path))


def _state_meta(path: Path, digest: str) -> tuple[dict[str, Tensor], dict]:
    try:
        tensors, metadata = read_safetensors(Path(path))
        meta = parse_json(metadata[STATE_KEY], "its metadata")  # nesting bounded
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateFileError(f"{path}: not a resumable state ({exc})") from None
    if meta.get("version") != STATE_VERSION or not isinstance(meta.get("step"), int):
        raise StateFileError(f"{path}: a state of another format version")
    if meta.get("digest") != digest:
        raise StateFileError(
            f"{path}: a state of another configuration or other inputs "
            f"({str(meta.get('digest'))[:12]} != {digest[:12]}); use another --out or remove it"
        )
    return tensors, meta


def check_state(path: Path, digest: str) -> int:
    """The steps done by the state at `path`; StateFileError when it is unreadable or belongs to
    another run (digest)."""
    return _state_meta(Path(path), digest)[1]["step"]


def read_state_tensors(path: Path, digest: str) -> dict[str, Tensor]:
    """Every tensor of the state at `path` ("param/<name>", "adam/<name>/<key>", "rng/torch")
    after its digest is checked."""
    return _state_meta(Path(path), digest)[0]


def _saved_for(tensors: dict[str, Tensor], name: str, p: Tensor) -> tuple[dict, str | None]:
    """AdamW's saved state of parameter `name` (reshaped), or what does not fit."""
    saved = tensors.get(f"param/{name}")
    if saved is None or saved.shape != p.shape or saved.dtype != p.dtype:
        return {}, f"param/{name}"
    if not bool(torch.isfinite(saved).all()):
        return {}, f"param/{name} (not finite)"
    moments = {}
    for key in (k for k in tensors if k.startswith(f"adam/{name}/")):
        part, value = key.rsplit("/", 1)[1], tensors[key]
        shape = () if part == "step" else p.shape
        if value.numel() != math.prod(shape):
            return {}, key
        moments[part] = value.reshape(shape)
    return moments, None


def load_state(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, digest: str
) -> tuple[int, History]:
    """Restore what `save_state` wrote into `model` and `opt` -> (steps done, history). Every
    tensor is checked (present, shape, dtype, finite) before anything changes."""
    tensors, meta = _state_meta(path, digest)
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in opt.param_groups for p in group["params"]]
    moments, problems = {}, []
    for index, p in enumerate(params):
        moments[index], problem = _saved_for(tensors, names[id(p)], p)
        problems += [problem] if problem else []
    expected = {f"param/{names[id(p)]}" for p in params}
    problems += sorted(k for k in tensors if k.startswith("param/") and k not in expected)
    if problems or "rng/torch" not in tensors:
        raise StateFileError(f"{path}: does not fit the model: {problems[:4] or ['rng/torch']}")
    with torch.no_grad():
        for p in params:
            p.copy_(tensors[f"param/{names[id(p)]}"])
    state = opt.state_dict()
    state["state"] = {i: m for i, m in moments.items() if m}
    opt.load_state_dict(state)
    torch.set_rng_state(tensors["rng/torch"])
    h = meta["history"]
    return meta["step"], History(list(h["losses"]), list(h["validation"]), float(h["seconds"]))


def _after_step(step: int) -> None:
    """Called after every finished step (and its save); tests replace it to stop a run."""


def _train_step(model, opt, batch, config: FinetuneConfig, params: list[Tensor]) -> float:
    device = params[0].device
    batch = {k: v.to(device) for k, v in batch.items()}
    opt.zero_grad(set_to_none=True)
    with _autocast(device, config.train.precision):
        loss = vggt_loss(model(batch["images"]), batch, config.loss)["objective"]
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the objective is {loss.item()}")
    loss.backward()
    if config.optim.clip > 0:
        torch.nn.utils.clip_grad_norm_(params, config.optim.clip)
    opt.step()
    return loss.item()


def run_training(
    model: nn.Module,
    train_set,
    val_set,
    config: FinetuneConfig,
    *,
    state_path: Path,
    digest: str,
    progress: Callable[[int, int, float, float | None], None] | None = None,
) -> History:
    """Train `model`'s trainable parameters, continuing from `state_path` when it holds this
    run's state (digest), saving it every train.save_every steps and at the end. progress(step,
    total, objective, validation objective or None) is called after each step."""
    opt = build_optimizer(model, config)
    params = [p for g in opt.param_groups for p in g["params"]]
    total = total_steps(config, len(train_set))
    start, history = 0, History()
    if Path(state_path).exists():
        start, history = load_state(Path(state_path), model, opt, digest)
    model.train()
    every = config.validation.every
    for step in range(start, total):
        tick = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = group["peak"] * lr_factor(step, total, config)
        idx = batch_indices(len(train_set), config.train.batch_size, config.train.seed, step)
        try:
            loss = _train_step(model, opt, collate([train_set[i] for i in idx]), config, params)
        except FloatingPointError as exc:
            raise FloatingPointError(f"step {step}: {exc}") from None
        history.losses.append(loss)
        val = None
        if val_set is not None and ((every and (step + 1) % every == 0) or step + 1 == total):
            with _autocast(params[0].device, config.train.precision):
                val = validate(model, val_set, config)
            history.validation.append({"step": step + 1, "objective": val})
        history.seconds += time.perf_counter() - tick
        if (step + 1) % config.train.save_every == 0 or step + 1 == total:
            save_state(Path(state_path), model, opt, step + 1, history, digest)
        if progress is not None:
            progress(step, total, loss, val)
        _after_step(step)
    return history
