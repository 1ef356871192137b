"""Measuring what autograd keeps for backward, and step times."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


def storage_key(t: Tensor) -> tuple[str, int]:
    """Identifies the storage under `t` (views share it). Meta tensors all report data_ptr 0, so
    there the storage object's own address tells them apart."""
    storage = t.untyped_storage()
    return (str(t.device), storage._cdata if t.device.type == "meta" else storage.data_ptr())


def saved_tensor_records(
    fn: Callable[[], Tensor], exclude: Iterable[Tensor] = ()
) -> list[tuple[tuple[int, ...], torch.dtype, int]]:
    """Run `fn` (a forward pass) and list every distinct tensor autograd saved for backward.

    Tensors sharing storage with anything in `exclude` (a model's parameters and buffers: they are not
    activations) are skipped; storages saved twice are counted once. Returns (shape, dtype, bytes).
    """
    excluded = {storage_key(t) for t in exclude}
    seen: set[tuple[str, int]] = set()
    records = []

    def pack(t: Tensor):
        key = storage_key(t)
        if key not in excluded and key not in seen:
            seen.add(key)
            records.append((tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return records


def saved_activation_bytes(model: nn.Module, fn: Callable[[], Tensor]) -> int:
    """Bytes of activations autograd keeps for the backward of `fn()`, excluding the model's own tensors."""
    own = [*model.parameters(), *model.buffers()]
    return sum(nbytes for _, _, nbytes in saved_tensor_records(fn, own))


def time_steps(
    step: Callable[[], None], steps: int, warmup: int = 1, device: torch.device | None = None
) -> float:
    """Median wall time of `step()` in seconds over `steps` runs after `warmup` runs, synchronising
    the CUDA device around each run (`device`, or the current one when CUDA is present)."""
    times = step_times(step, steps, warmup, device)
    return sorted(times)[len(times) // 2]


def step_times(
    step: Callable[[], None], steps: int, warmup: int = 1, device: torch.device | None = None
) -> list[float]:
    """Wall time of each of `steps` runs of `step()` in seconds, after `warmup` runs (synchronised
    as `time_steps` does)."""
    if device is not None and device.type != "cuda":
        sync = lambda: None  # noqa: E731
    elif device is not None:
        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    else:
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times
