"""Helpers shared by tests and benchmarks: input factories, tolerances, error measures."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Relative tolerance (max error / max |reference|) of a backend against the float64 truth.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def layer_inputs(
    tokens: int,
    d_in: int,
    d_out: int,
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    m_scale: float = 1.0,
) -> dict[str, Tensor]:
    """Fresh random x (tokens, d_in), weight (d_out, d_in), bias, orthonormal U, V and a nonzero M."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(
            device=device, dtype=dtype
        )

    U = torch.linalg.qr(torch.randn(d_out, rank, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d_in, rank, generator=g, dtype=torch.float64))[0]
    return {
        "x": rand(tokens, d_in),
        "weight": rand(d_out, d_in, std=1 / math.sqrt(d_in)),
        "bias": rand(d_out, std=0.1),
        "U": U.to(device=device, dtype=dtype),
        "V": V.to(device=device, dtype=dtype),
        "M": (torch.randn(rank, rank, generator=g, dtype=torch.float64) * m_scale).to(
            device=device, dtype=torch.float32
        ),
    }


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def sqnr_db(actual: Tensor, expected: Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB: 20 log10(||expected|| / ||actual - expected||)."""
    a, e = actual.detach().double(), expected.detach().double()
    noise = (a - e).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(e.norm() / noise))


def assert_close(
    actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str, baseline: Tensor | None = None
) -> None:
    """Check `actual` against the float64 `expected` at the dtype's tolerance.

    With `baseline` (the same quantity computed by plain torch in `dtype`), low-precision results may
    also pass by the flash-attention rule: error at most 2x plain torch's own error.
    """
    if not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{what}: holds NaN or Inf (an element not written?)")
    err = relative_error(actual, expected)
    if err <= RTOL[dtype]:
        return
    if baseline is not None and err <= 2 * relative_error(baseline, expected):
        return
    raise AssertionError(
        f"{what} ({dtype}): relative error {err:.3e} > {RTOL[dtype]:.1e}; SQNR {sqnr_db(actual, expected):.1f} dB"
    )
