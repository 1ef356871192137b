"""Argument checks shared by every entry point (modules, inject, bank and adapter files, CLI)."""

from __future__ import annotations

import math
import numbers

import torch


def positive_finite(name: str, value, where: str = "") -> float:
    """`value` as a float if it is a real number, finite and > 0; otherwise a ValueError naming it.

    Scales and LoRA alphas enter every output multiplied in: a NaN, Inf, zero or negative one makes
    every output wrong or the adapter a silent no-op, so it is refused wherever it comes in.
    """
    at = f" ({where})" if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}{at} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name}{at} must be finite and > 0, got {value!r}")
    return number


def positive_int(name: str, value, where: str = "") -> int:
    """`value` if it is an int >= 1 (bools refused); otherwise an error naming it."""
    at = f" ({where})" if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}{at} must be an integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}{at} must be >= 1, got {value!r}")
    return int(value)


def probability(name: str, value, where: str = "") -> float:
    """`value` as a float in [0, 1)."""
    at = f" ({where})" if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}{at} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not (0.0 <= number < 1.0):
        raise ValueError(f"{name}{at} must be in [0, 1), got {value!r}")
    return number


def usable_device(device) -> torch.device:
    """`device` as a torch.device that holds data here; ValueError naming it otherwise (not a device
    name, CUDA absent or an index past the last GPU, meta, or a backend that cannot allocate)."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device ({exc})") from exc
    if target.type == "meta":
        raise ValueError(f"device {device!r} holds no data")
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: CUDA is not available (this machine has no CUDA device)"
            )
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif target.type != "cpu":
        try:
            torch.empty(0, device=target)
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} is not usable here ({exc})") from exc
    return target
