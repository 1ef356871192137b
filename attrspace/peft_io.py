"""LoRA factors in peft's on-disk layout, in and out.

A peft LoRA adapter folder holds `adapter_config.json` (peft_type "LORA", r, lora_alpha, target_modules,
rank_pattern, alpha_pattern, use_rslora, ...) and `adapter_model.safetensors` with keys
`base_model.model.<module name>.lora_A.weight` (r, d_in) [(r, c_in, kh, kw) for Conv2d] and
`...lora_B.weight` (d_out, r) [(c_out, r, 1, 1)]. Reading it here lets LoRAs trained with peft be mined.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ._io import atomic_save_safetensors, atomic_write_bytes, read_safetensors
from .nn import LoRAConv2d, LoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


class AdapterFileError(ValueError):
    """A peft adapter folder that cannot be read or is inconsistent."""


@dataclass
class LoRAFactors:
    """One LoRA layer: A (r, d_in[, kh, kw]), B (d_out, r[, 1, 1]); update = scale * B A."""

    A: Tensor
    B: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def left_right(self) -> tuple[Tensor, Tensor]:
        """Factor form of the update as (P, Q) with update = P Q^T: P = scale * B (d_out, r), Q = A^T."""
        return self.scale * self.B.flatten(1), self.A.flatten(1).t()


def lora_state(model: nn.Module) -> dict[str, LoRAFactors]:
    """The LoRA factors of every LoRALinear / LoRAConv2d in `model`, by qualified module name."""
    return {
        name: LoRAFactors(m.lora_A.weight.detach(), m.lora_B.weight.detach(), m.scaling)
        for name, m in model.named_modules()
        if isinstance(m, (LoRALinear, LoRAConv2d))
    }


def save_peft(
    model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str = ""
) -> Path:
    """Write the LoRA adapters of `model` as a peft adapter folder. All layers must share r and alpha."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))}
    if not layers:
        raise ValueError("the model holds no LoRA layers (inject_lora first)")
    ranks = {(m.rank, m.alpha) for m in layers.values()}
    if len(ranks) != 1:
        raise ValueError(
            f"peft's layout needs one (r, alpha) for all layers here, found {sorted(ranks)}"
        )
    ((rank, alpha),) = ranks
    folder = Path(folder)
    tensors = {}
    for name, m in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": None,
    }
    atomic_save_safetensors(tensors, {"format": "pt"}, folder / WEIGHTS_NAME)
    atomic_write_bytes(folder / CONFIG_NAME, json.dumps(config, indent=2).encode())
    return folder


def _pattern_value(name: str, pattern: dict, default):
    """peft's rank_pattern / alpha_pattern: a key matches a module name by regex on its end."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def load_peft(folder: str | os.PathLike) -> dict[str, LoRAFactors]:
    """Read a peft LoRA adapter folder into factors by module name, validating every layer."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{config_path}: cannot read the adapter config ({exc})") from exc
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}, expected 'LORA'"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise AdapterFileError(
                f"{config_path}: {key} must be a positive number, got {config.get(key)!r}"
            )
    if config.get("use_dora"):
        raise AdapterFileError(
            f"{config_path}: DoRA adapters are not plain LoRA and cannot be read"
        )
    try:
        tensors, _ = read_safetensors(folder / WEIGHTS_NAME)
    except ValueError as exc:
        raise AdapterFileError(str(exc)) from exc
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterFileError(f"{folder / WEIGHTS_NAME}: key {key!r} is not a LoRA A/B weight")
        parts.setdefault(match.group(1), {})[match.group(2)] = t
    factors = {}
    for name, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterFileError(
                f"{folder}: layer {name}: has only lora_{sorted(pair)}, needs A and B"
            )
        A, B = pair["A"], pair["B"]
        r = _pattern_value(name, config.get("rank_pattern") or {}, config["r"])
        alpha = _pattern_value(name, config.get("alpha_pattern") or {}, config["lora_alpha"])
        if A.shape[0] != r or B.shape[1] != r or A.ndim not in (2, 4) or B.ndim != A.ndim:
            raise AdapterFileError(
                f"{folder}: layer {name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit rank {r}"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterFileError(f"{folder}: layer {name}: factors hold NaN or Inf")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors[name] = LoRAFactors(A, B, float(scale))
    if not factors:
        raise AdapterFileError(f"{folder / WEIGHTS_NAME}: holds no LoRA weights")
    return factors


def load_peft_into(model: nn.Module, factors: dict[str, LoRAFactors]) -> None:
    """Copy factors into the LoRA layers of an injected model (same names, shapes and rank)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))}
    problems = [f"{n}: not a LoRA layer of the model" for n in factors if n not in layers]
    for n, f in factors.items():
        if n in layers and (
            layers[n].lora_A.weight.shape != f.A.shape or layers[n].lora_B.weight.shape != f.B.shape
        ):
            problems.append(
                f"{n}: model has A {tuple(layers[n].lora_A.weight.shape)}, file {tuple(f.A.shape)}"
            )
    if problems:
        raise ValueError("the adapter does not fit the model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for n, f in factors.items():
            layers[n].lora_A.weight.copy_(f.A)
            layers[n].lora_B.weight.copy_(f.B)
            layers[n].scaling = f.scale
