"""The built-in demo: a random bank injected into the small ViT, M trained for a few steps, compared
with LoRA r=16 (trainable parameters, step time, saved-activation memory)."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attrspace.adapters.inject import inject, inject_lora
from attrspace.bank import linear_shapes, random_bank
from attrspace.measure.profiling import saved_activation_bytes, step_times
from attrspace.models.vit import ADAPTED, TinyViT


@dataclass
class DemoRow:
    method: str
    trainable: int
    step_ms: float
    saved_mib: float
    loss_start: float
    loss_end: float
    step_times_ms: list[float] = field(default_factory=list)

    def quartiles(self) -> tuple[float, float]:
        """The first and third quartiles of the step times (ms)."""
        if len(self.step_times_ms) < 2:
            return self.step_ms, self.step_ms
        q = statistics.quantiles(self.step_times_ms, n=4, method="inclusive")
        return q[0], q[2]


def _unit_low_rank(shape: torch.Size, rank: int) -> Tensor:
    """A random matrix of the given rank and unit Frobenius norm."""
    update = torch.randn(shape[0], rank) @ torch.randn(rank, shape[1])
    return update / update.norm()


def _train(
    model: nn.Module, batch: Tensor, target: Tensor, steps: int, lr: float, progress=None
) -> DemoRow:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(batch), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress()

    times = [1e3 * t for t in step_times(step, steps=steps, warmup=1)]
    saved = saved_activation_bytes(model, lambda: model(batch))
    return DemoRow(
        "",
        sum(p.numel() for p in params),
        statistics.median(times),
        saved / 2**20,
        losses[0],
        losses[-1],
        times,
    )


def time_ratio_note(sub: DemoRow, lora: DemoRow) -> str | None:
    """A line when the step-time ratio is not resolved: the ratio's range from the two methods'
    quartiles is wider than the ratio's distance from 1."""
    ratio = sub.step_ms / lora.step_ms
    (s1, s3), (l1, l3) = sub.quartiles(), lora.quartiles()
    low, high = s1 / l3, s3 / l1
    if high - low <= abs(ratio - 1.0):
        return None
    return (
        f"note: the step-time ratio {ratio:.2f} lies within its spread ({low:.2f} to {high:.2f} "
        f"from the quartiles of {len(sub.step_times_ms)} steps each): not resolved by this run"
    )


def check_demo_args(
    dim: int, depth: int, tokens: int, rank: int, lora_rank: int, steps: int, seed: int
) -> None:
    """ValueError naming the first argument of run_demo that cannot work."""
    for name, value, low in (
        ("dim", dim, 1),
        ("depth", depth, 1),
        ("tokens", tokens, 2),
        ("rank", rank, 1),
        ("lora_rank", lora_rank, 1),
        ("steps", steps, 1),
        ("seed", seed, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if tokens % 2:
        raise ValueError(f"tokens must be even (two sequences of tokens / 2), got {tokens}")
    heads = max(1, dim // 64)
    if dim % heads:
        raise ValueError(f"dim must be a multiple of its {heads} heads (dim // 64), got {dim}")
    if rank > dim:
        raise ValueError(f"rank must be <= dim = {dim} (a basis of the layer), got {rank}")
    if seed >= 2**63:
        raise ValueError(f"seed must be < 2**63, got {seed}")


def run_demo(
    dim: int = 256,
    depth: int = 4,
    tokens: int = 1024,
    rank: int = 16,
    lora_rank: int = 16,
    steps: int = 8,
    seed: int = 0,
    progress: Callable[[], None] | None = None,
) -> list[DemoRow]:
    """Train the same task with a mined-style bank (random orthonormal here) and with LoRA.
    Arguments are checked first (check_demo_args); `progress()` is called after every training
    step (2 (steps + 1) calls)."""
    check_demo_args(dim, depth, tokens, rank, lora_rank, steps, seed)
    torch.manual_seed(seed)
    base = TinyViT(dim=dim, depth=depth, heads=max(1, dim // 64))
    batch = torch.randn(2, tokens // 2, 48)
    # The task: match a teacher whose adapted layers moved by a random low-rank update.
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for name in linear_shapes(teacher, ADAPTED):
            w = teacher.get_submodule(name).weight
            w += 0.2 * w.norm() * _unit_low_rank(w.shape, 4)
        target = teacher(batch)
    rows = []
    sub = copy.deepcopy(base)
    bank = random_bank(linear_shapes(sub, ADAPTED), rank, scale=2.0, seed=seed)
    report = inject(sub, bank)
    row = _train(sub, batch, target, steps, lr=1e-2, progress=progress)
    row.method = f"subspace K={rank} ({len(report.layers)} layers)"
    rows.append(row)
    lora = copy.deepcopy(base)
    report = inject_lora(lora, ADAPTED, rank=lora_rank, alpha=2 * lora_rank)
    row = _train(lora, batch, target, steps, lr=1e-3, progress=progress)
    row.method = f"LoRA r={lora_rank} ({len(report.layers)} layers)"
    rows.append(row)
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    lines = [
        f"{'method':<36}{'trainable':>11}{'step ms':>10}{'saved MiB':>11}{'loss start':>12}{'loss end':>10}"
    ]
    for r in rows:
        lines.append(
            f"{r.method:<36}{r.trainable:>11,}{r.step_ms:>10.1f}{r.saved_mib:>11.2f}{r.loss_start:>12.4f}{r.loss_end:>10.4f}"
        )
    return "\n".join(lines)
