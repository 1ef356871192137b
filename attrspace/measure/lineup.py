"""The line-up of one layer, in one place: frozen nn.Linear vs SubspaceLinear vs LoRALinear (and
peft's LoRA), forward + backward per training step (input gradient always; M or the LoRA factors
when adapted). `attrspace bench` and bench/bench_linear.py build their layers here.

Timings are repeated: `bench_layer` measures every layer `repeats` times, interleaved (so a burst of
load on a shared machine hits every layer alike), and reports per layer the median step time over
the repeats and its range, and per ratio to the frozen layer the median of the per-repeat ratios
and their range. A ratio whose range is wider than its distance from 1 is not resolved by the
measurement, and `format_rows` says so.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attrspace.adapters.nn import LoRALinear, SubspaceLinear
from attrspace.measure.profiling import saved_activation_bytes, step_times

KINDS = ("frozen", "subspace", "lora", "peft")
LABELS = {
    "frozen": "frozen nn.Linear",
    "subspace": "SubspaceLinear",
    "lora": "LoRALinear",
    "peft": "peft LoRA",
}


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


def build_layer(
    kind: str,
    d_in: int,
    d_out: int,
    rank: int = 64,
    lora_rank: int = 16,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> nn.Module:
    """One layer of the line-up with the same frozen W0 (from `seed`) for every kind: the frozen
    nn.Linear; SubspaceLinear with random orthonormal U, V (K = rank, scale 2) and nonzero M; LoRA
    of rank lora_rank (alpha 2 r) with nonzero B, ours or peft's. Nonzero factors make every path do
    its full work."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    generator = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=generator) / d_in**0.5)
        base.bias.copy_(torch.randn(d_out, generator=generator) * 0.1)
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    if kind == "frozen":
        return base
    if kind == "subspace":
        U = _orthonormal(d_out, rank, generator).to(device=device, dtype=dtype)
        V = _orthonormal(d_in, rank, generator).to(device=device, dtype=dtype)
        layer = SubspaceLinear.from_linear(base, U, V, 2.0, backend)
        with torch.no_grad():
            layer.M.copy_(0.01 * torch.randn(rank, rank, generator=generator))
        return layer
    if kind == "lora":
        layer = LoRALinear.from_linear(base, lora_rank, 2.0 * lora_rank)
        with torch.no_grad():
            layer.lora_B.weight.copy_(0.01 * torch.randn(d_out, lora_rank, generator=generator))
        return layer
    return _peft_lora(base, lora_rank)


def _peft_lora(base: nn.Linear, lora_rank: int) -> nn.Module:
    import peft  # optional and slow to import: only when peft's LoRA is in the line-up

    holder = nn.Sequential()
    holder.add_module("layer", base)
    config = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=["layer"])
    model = peft.get_peft_model(holder, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    return model


def training_step(module: nn.Module, x: Tensor, dy: Tensor) -> Callable[[], None]:
    """One forward + backward of `module` on x with output gradient dy (the input gradient is
    always formed, as inside a network)."""
    x = x.detach().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(dy)

    return step


@dataclass
class LayerTiming:
    """One row: step time (median over repeats, and the range of the per-repeat medians), the ratio
    to the frozen layer (median and range of the per-repeat ratios), trainable parameters and
    saved-activation bytes of one step."""

    layer: str
    step_ms: float
    trainable: int
    saved_bytes: int
    ms_range: tuple[float, float] = (0.0, 0.0)
    ratio: float = 1.0
    ratio_range: tuple[float, float] = (1.0, 1.0)
    per_repeat_ms: list[float] = field(default_factory=list)

    @property
    def resolved(self) -> bool:
        """Whether the spread of the ratio over the repeats is within its distance from 1."""
        low, high = self.ratio_range
        return high - low <= abs(self.ratio - 1.0)


def _check(d_in, d_out, tokens, rank, lora_rank, steps, repeats) -> None:
    for name, value in (
        ("d_in", d_in),
        ("d_out", d_out),
        ("tokens", tokens),
        ("steps", steps),
        ("repeats", repeats),
        ("lora_rank", lora_rank),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 1 <= rank <= min(d_in, d_out):
        raise ValueError(f"rank must be in [1, min(d_in, d_out) = {min(d_in, d_out)}], got {rank}")


def bench_layer(
    d_in: int,
    d_out: int,
    tokens: int,
    rank: int,
    lora_rank: int,
    steps: int = 5,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    repeats: int = 3,
    progress: Callable[[], None] | None = None,
) -> list[LayerTiming]:
    """Time a training step of frozen / SubspaceLinear / LoRALinear at one shape: x (tokens, d_in),
    `repeats` rounds of `steps` timed steps (after one warm-up) per layer, interleaved.
    `progress()` is called after each layer's round (repeats x 3 calls)."""
    _check(d_in, d_out, tokens, rank, lora_rank, steps, repeats)
    kinds = ("frozen", "subspace", "lora")
    layers = {
        k: build_layer(k, d_in, d_out, rank, lora_rank, backend, dtype, device, seed) for k in kinds
    }
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, d_in, generator=generator).to(device=device, dtype=dtype)
    dy = torch.randn(tokens, d_out, generator=generator).to(device=device, dtype=dtype)
    runs = {k: training_step(m, x, dy) for k, m in layers.items()}
    per_repeat: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for k in kinds:
            times = step_times(runs[k], steps, warmup=1, device=torch.device(device))
            per_repeat[k].append(1e3 * statistics.median(times))
            if progress is not None:
                progress()
    return [_row(k, layers[k], x, per_repeat) for k in kinds]


def _row(kind: str, module: nn.Module, x: Tensor, per_repeat: dict) -> LayerTiming:
    ms = per_repeat[kind]
    ratios = [a / b for a, b in zip(ms, per_repeat["frozen"], strict=True)]
    x_in = x.detach().requires_grad_(True)
    return LayerTiming(
        LABELS[kind],
        statistics.median(ms),
        sum(p.numel() for p in module.parameters() if p.requires_grad),
        saved_activation_bytes(module, lambda: module(x_in)),
        (min(ms), max(ms)),
        statistics.median(ratios),
        (min(ratios), max(ratios)),
        list(ms),
    )


def format_rows(rows: list[LayerTiming]) -> str:
    """A plain-text table: median step time and its range over the repeats, the ratio to the frozen
    layer with its range; then a line for every ratio the spread does not resolve."""
    lines = [
        f"{'layer':<18}{'step ms':>9}{'range':>17}{'x frozen':>10}{'range':>14}"
        f"{'trainable':>11}{'saved MiB':>11}"
    ]
    for r in rows:
        ms = f"{r.ms_range[0]:.2f}-{r.ms_range[1]:.2f}"
        ratio = f"{r.ratio_range[0]:.2f}-{r.ratio_range[1]:.2f}"
        lines.append(
            f"{r.layer:<18}{r.step_ms:>9.2f}{ms:>17}{r.ratio:>10.2f}{ratio:>14}"
            f"{r.trainable:>11,}{r.saved_bytes / 2**20:>11.2f}"
        )
    for r in rows[1:]:
        if not r.resolved:
            lines.append(
                f"note: {r.layer} / frozen varied from {r.ratio_range[0]:.2f} to "
                f"{r.ratio_range[1]:.2f} over {len(r.per_repeat_ms)} repeats, more than its "
                f"median {r.ratio:.2f} differs from 1: this run does not resolve the difference "
                "(raise --repeats / --steps, or measure on an idle machine)"
            )
    return "\n".join(lines)
