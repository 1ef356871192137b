"""One training loop for every stage: pre-training, attribute LoRAs and downstream fine-tuning.

AdamW on the parameters that require grad, linear warm-up then cosine decay (the released VGGT
fine-tuning schedule, shortened), gradient-norm clipping, the VGGT multitask loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attrspace.train.losses import LossConfig, scene_terms, vggt_loss

BATCH_KEYS = ("images", "depths", "extrinsics", "intrinsics", "world_points", "point_masks")


@dataclass(frozen=True)
class TrainConfig:
    """steps, peak lr, AdamW weight decay, warm-up fraction, final lr as a fraction of the peak,
    gradient-norm clip (0: none), scenes per batch, seed of the batch order."""

    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: float = 0.05
    final_lr_ratio: float = 1e-3
    clip: float = 1.0
    batch_size: int = 1
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )
        if not (self.lr > 0 and 0 <= self.warmup < 1 and 0 < self.final_lr_ratio <= 1):
            raise ValueError("need lr > 0, 0 <= warmup < 1, 0 < final_lr_ratio <= 1")


@dataclass
class TrainLog:
    """Loss per step, wall time, the median step time, and how often each composition of loss
    terms was used by a scene in a step (e.g. {"camera+depth+point": 95, "camera up to scale": 5};
    "none" for a scene no term used; see losses.scene_terms)."""

    losses: list[float]
    seconds: float
    step_ms: float
    trainable_params: int
    scene_terms: dict[str, int] = field(default_factory=dict)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then cosine to final_lr_ratio."""
    warm = max(1, round(config.warmup * config.steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    low = config.final_lr_ratio
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))


def collate(samples: Sequence[dict]) -> dict[str, Tensor]:
    """Stack scene samples (same views and size) into a batch with a leading B dim."""
    return {k: torch.stack([s[k] for s in samples]) for k in BATCH_KEYS}


def batches(dataset, batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled batches of a map-style dataset of scene samples."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(dataset), generator=g).tolist()
        for start in range(
            0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size
        ):
            idx = order[start : start + batch_size]
            yield collate([dataset[i] for i in idx])


def train(
    model: nn.Module,
    dataset,
    config: TrainConfig,
    progress: Callable[[int, float], None] | None = None,
) -> TrainLog:
    """Train the parameters of `model` that require grad on `dataset` for config.steps steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config))
    model.train()
    losses, times, composition = [], [], {}
    start = time.perf_counter()
    stream = batches(dataset, config.batch_size, config.seed)
    for step in range(config.steps):
        batch = {k: v.to(device) for k, v in next(stream).items()}
        tick = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        predictions = model(batch["images"])
        loss = vggt_loss(predictions, batch, config.loss)["objective"]
        for terms in scene_terms(batch, predictions, config.loss):
            key = "+".join(terms) or "none"
            composition[key] = composition.get(key, 0) + 1
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        loss.backward()
        if config.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.clip)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - tick)
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    return TrainLog(
        losses=losses,
        seconds=time.perf_counter() - start,
        step_ms=1e3 * sorted(times)[len(times) // 2],
        trainable_params=sum(p.numel() for p in params),
        scene_terms=composition,
    )


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, dataset, config: LossConfig | None = None, limit: int | None = None
) -> float:
    """Mean objective over the dataset's scenes (one scene per batch)."""
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset) if limit is None else min(limit, len(dataset))
    total = 0.0
    for i in range(n):
        batch = {k: v.to(device) for k, v in collate([dataset[i]]).items()}
        total += vggt_loss(model(batch["images"]), batch, config)["objective"].item()
    return total / max(n, 1)
