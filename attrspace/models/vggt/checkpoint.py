"""Loading official VGGT checkpoints (`model.pt`, `model.safetensors`, trainer checkpoints) into
`VGGT`, one tensor at a time and memory-mapped, so a 5 GB file never needs two copies in memory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

# Parts of the official model this package does not build; their keys are skipped when the model
# lacks the module, with a report line.
_OPTIONAL_HEADS = ("track_head", "point_head", "depth_head", "camera_head")
# PEFT-style names of adapter factors: never base weights.
_ADAPTER_KEY = re.compile(r"\.(lora_[A-Za-z_]+|lora_magnitude_vector)\.")


@dataclass
class LoadReport:
    """What `load_checkpoint` did. Keys are model state-dict names."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, fit nothing in the model
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, file, model
    skipped: dict[str, int] = field(default_factory=dict)  # absent head -> number of keys
    adapter_keys: list[str] = field(default_factory=list)  # LoRA factors found in the file
    renamed: int = 0  # keys whose name was normalised (module. / peft prefixes)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"checkpoint {self.path}: {len(self.loaded)} tensors loaded"]
        if self.renamed:
            lines.append(f"  {self.renamed} names normalised (DDP 'module.' / peft prefixes)")
        for head, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n} keys of {head} (the model has no {head})")
        if self.adapter_keys:
            lines.append(
                f"  ignored {len(self.adapter_keys)} adapter keys, e.g. {self.adapter_keys[0]}"
            )
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(
                    f"  {len(keys)} {label}: {', '.join(keys[:8])}"
                    + (" ..." if len(keys) > 8 else "")
                )
        for key, file_shape, model_shape in self.mismatched[:8]:
            lines.append(f"  shape mismatch {key}: file {file_shape}, model {model_shape}")
        if len(self.mismatched) > 8:
            lines.append(f"  ... {len(self.mismatched) - 8} more shape mismatches")
        return "\n".join(lines)


def normalize_key(key: str) -> str:
    """Map a DDP- or PEFT-wrapped name back to the plain model name."""
    while key.startswith("module."):
        key = key[len("module.") :]
    if key.startswith("base_model.model."):
        key = key[len("base_model.model.") :]
    return key.replace(".base_layer.", ".")


def _unwrap(obj, path: str) -> dict:
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                return obj[wrapper]
        if all(isinstance(k, str) for k in obj) and any(
            isinstance(v, Tensor) for v in obj.values()
        ):
            return obj
    raise ValueError(
        f"{path}: expected a state dict or a dict with a 'model' state dict, "
        f"got {type(obj).__name__}"
    )


class _Source:
    """Names, shapes and lazily read tensors of a checkpoint file.

    safetensors: shapes come from the header and each tensor is read from a memory map on demand;
    torch files are opened with mmap=True, so tensors stay on disk until copied.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._safe = None
        self._dict: dict | None = None
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                self._safe = safe_open(path, framework="pt", device="cpu")
            except Exception as err:
                raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
            self.shapes = {k: tuple(self._safe.get_slice(k).get_shape()) for k in self._safe.keys()}
            return
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise ValueError(f"{path}: not a readable torch checkpoint ({err})") from err
            # Files in the legacy (pre-zip) format cannot be memory-mapped.
            obj = self._load_legacy(path)
        except Exception as err:
            raise ValueError(f"{path}: not a readable torch checkpoint ({err})") from err
        self._dict = _unwrap(obj, path)
        for key, value in self._dict.items():
            if not isinstance(value, Tensor):
                raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        self.shapes = {k: tuple(v.shape) for k, v in self._dict.items()}

    @staticmethod
    def _load_legacy(path: str):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path}: not a readable torch checkpoint ({err})") from err

    def get(self, key: str) -> Tensor:
        if self._safe is not None:
            return self._safe.get_tensor(key)
        return self._dict[key]


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, attr = key.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True
) -> LoadReport:
    """Load an official-layout checkpoint into `model` (a `VGGT`, before adapters are injected).

    Accepts a plain state dict, `{"model": state_dict}` (trainer checkpoints), or safetensors;
    strips DDP's `module.` and maps peft names (`base_model.model.`, `.base_layer.`) back. Keys of
    heads the model does not have (the track head always; point / depth / camera heads when
    disabled) are skipped with a report line. Parameters on the meta device are replaced by the
    loaded tensors (no copy beyond the memory map), others are copied into in place.

    strict: raise ValueError if anything is missing, unexpected or mis-shaped, before any tensor is
    touched; otherwise the report lists it (and, in a meta-built model, whatever is missing stays on
    the meta device). Returns a LoadReport (print it for a summary).
    """
    path = os.fspath(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    source = _Source(path)
    targets = model.state_dict(keep_vars=True)
    report = LoadReport(path=path)
    plan: list[tuple[str, str]] = []  # (file key, model key)
    planned: set[str] = set()
    for raw_key, shape in source.shapes.items():
        if _ADAPTER_KEY.search(raw_key):
            report.adapter_keys.append(raw_key)
            continue
        key = normalize_key(raw_key)
        report.renamed += key != raw_key
        if key in planned:
            raise ValueError(f"{path}: two entries map to {key!r} (one is {raw_key!r})")
        if key not in targets:
            head = key.split(".", 1)[0]
            if head in _OPTIONAL_HEADS and getattr(model, head, None) is None:
                report.skipped[head] = report.skipped.get(head, 0) + 1
            else:
                report.unexpected.append(key)
            continue
        if shape != tuple(targets[key].shape):
            report.mismatched.append((key, shape, tuple(targets[key].shape)))
            continue
        plan.append((raw_key, key))
        planned.add(key)
    misfit = {key for key, _, _ in report.mismatched}
    report.missing = [k for k in targets if k not in planned and k not in misfit]
    # Everything is checked before the first tensor is touched: a refused file changes nothing.
    if strict and not report.ok:
        raise ValueError(f"checkpoint does not fit the model:\n{report}")
    for raw_key, key in plan:
        _assign(model, key, targets[key], source.get(raw_key))
        report.loaded.append(key)
    # Buffers outside the state dict (image normalisation) must be real after a meta build.
    aggregator = getattr(model, "aggregator", None)
    if aggregator is not None and aggregator._resnet_mean.is_meta:
        aggregator.reset_constant_buffers(device="cpu")
    return report


def _assign(model: nn.Module, key: str, target: Tensor, tensor: Tensor) -> None:
    if not target.is_meta:
        with torch.no_grad():
            target.copy_(tensor)
        return
    owner, attr = _owner(model, key)
    value = tensor.to(target.dtype)
    if isinstance(target, nn.Parameter):
        owner.register_parameter(attr, nn.Parameter(value, requires_grad=target.requires_grad))
    else:
        owner.register_buffer(attr, value)
