"""Loading official VGGT checkpoints into `VGGT`, one tensor at a time and memory-mapped, so a 5 GB
file never needs two copies in memory. Sources: a file (`model.pt`, `model.safetensors`, trainer
checkpoints), a Hugging Face snapshot folder (`config.json` + `model.safetensors` or sharded
safetensors with `model.safetensors.index.json`, what the official `VGGT.from_pretrained` reads), or a
hub id such as "facebook/VGGT-1B" (downloaded with huggingface_hub, the optional `[hub]` extra).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from attrspace.models.vggt.config import CONFIG_FILE, VGGTConfig
from attrspace.models.vggt.model import VGGT
from attrspace.util.files import BadFileError, read_json, regular_file

# Parts of the official model this package does not build; their keys are skipped when the model
# lacks the module, with a report line.
_OPTIONAL_HEADS = ("track_head", "point_head", "depth_head", "camera_head")
# PEFT-style names of adapter factors: never base weights.
_ADAPTER_KEY = re.compile(r"\.(lora_[A-Za-z_]+|lora_magnitude_vector)\.")
# "owner/name" as the Hugging Face Hub spells repository ids (a path with one relative step).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What a snapshot download fetches: the config and the safetensors weights, not model.pt (the
# official repository ships both; the .pt file would double the download).
_HUB_PATTERNS = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "*.safetensors",
]
_SINGLE, _INDEX, _TORCH = "model.safetensors", "model.safetensors.index.json", "model.pt"
# Fields of the official constructor (config.json) that fix tensor shapes.
_SIZE_FIELDS = ("img_size", "patch_size", "embed_dim")


@dataclass
class LoadReport:
    """What `load_checkpoint` did. Keys are model state-dict names."""

    path: str  # what was loaded: a file, a folder, or "hub id (snapshot folder)"
    files: list[str] = field(default_factory=list)  # the weight files read
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
        regular_file(path)  # a FIFO would block the open, a device be mapped
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


def _read_json(path: Path) -> dict:
    try:
        obj = read_json(path)  # the bounded reader: a FIFO, a device, deep nesting refused
    except (OSError, BadFileError) as err:
        detail = str(err).removeprefix(f"{path}: ")
        raise ValueError(f"{path}: not a readable JSON file ({detail})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


class _ShardedSource:
    """The shards named by a `model.safetensors.index.json`, as one source. The index must name
    exactly the tensors each shard holds, and shards must lie in the index's folder."""

    def __init__(self, index_path: Path) -> None:
        self.path = str(index_path)
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: 'weight_map' must be a non-empty object")
        by_shard: dict[str, set[str]] = {}
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise ValueError(f"{index_path}: tensor {key!r} maps to {shard!r}, not a file name")
            by_shard.setdefault(shard, set()).add(key)
        self.files: list[str] = []
        self.shapes: dict[str, tuple] = {}
        self._owner: dict[str, _Source] = {}
        for shard, keys in sorted(by_shard.items()):
            shard_path = index_path.parent / shard
            if not shard_path.is_file():
                raise FileNotFoundError(
                    f"{index_path}: shard {shard} not found in {shard_path.parent}"
                )
            if not shard.endswith(".safetensors"):
                raise ValueError(f"{index_path}: shard {shard} is not a .safetensors file")
            source = _Source(str(shard_path))
            extra, absent = sorted(set(source.shapes) - keys), sorted(keys - set(source.shapes))
            if extra or absent:
                what = (
                    f"holds {extra[0]!r}, which the index puts elsewhere"
                    if extra
                    else (f"lacks {absent[0]!r}, which the index puts there")
                )
                raise ValueError(f"{shard_path}: {what} ({len(extra) + len(absent)} keys differ)")
            self.files.append(str(shard_path))
            self.shapes.update(source.shapes)
            self._owner.update(dict.fromkeys(source.shapes, source))

    def get(self, key: str) -> Tensor:
        return self._owner[key].get(key)


def _check_config(model: nn.Module, config_path: Path) -> None:
    """config.json holds the official constructor's arguments; those that fix shapes must agree
    with the model's (when it carries a `config`), so a wrong snapshot fails with a clear line."""
    config = _read_json(config_path)
    ours = getattr(model, "config", None)
    for name in _SIZE_FIELDS:
        if name not in config:
            continue
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{config_path}: {name} must be a positive integer, got {value!r}")
        expected = getattr(ours, name, None)
        if expected is not None and expected != value:
            raise ValueError(
                f"{config_path}: {name} is {value}, the model was built with {expected}"
            )


def _open_folder(model: nn.Module, folder: Path):
    """The weights of a snapshot folder, checked against its config.json when there is one.
    exists(), not is_file(): a FIFO or a device in a file's place is named by the reader."""
    if (folder / "config.json").exists():
        _check_config(model, folder / "config.json")
    if (folder / _SINGLE).exists():  # what PyTorchModelHubMixin writes and reads
        source = _Source(str(folder / _SINGLE))
        return source, [source.path]
    if (folder / _INDEX).exists():
        source = _ShardedSource(folder / _INDEX)
        return source, source.files
    if (folder / _TORCH).exists():
        source = _Source(str(folder / _TORCH))
        return source, [source.path]
    raise FileNotFoundError(
        f"{folder}: a checkpoint folder must hold {_SINGLE}, {_INDEX} (sharded) or {_TORCH}"
    )


def _looks_like_hub_id(source) -> bool:
    """A str "owner/name" that names no weight file (a Path is always a path)."""
    return (
        isinstance(source, str)
        and bool(_HUB_ID.match(source))
        and not source.endswith((".pt", ".pth", ".bin", ".safetensors", ".json"))
    )


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ImportError(
            f"{repo_id!r} is no local file or folder; loading it as a Hugging Face hub id needs "
            "huggingface_hub: pip install 'attrspace[hub]'"
        ) from err
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as err:  # offline, unknown repository, gated, HTTP errors: all one message
        raise OSError(
            f"{repo_id!r} is no local file or folder, and fetching it from the Hugging Face Hub "
            f"failed ({type(err).__name__}: {err}); without network access, download the snapshot "
            "elsewhere and pass its folder"
        ) from err
    return Path(folder)


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, attr = key.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _open_source(
    model: nn.Module, source: str | os.PathLike, revision: str | None
) -> tuple[_Source, LoadReport]:
    """The checkpoint behind `source` (file, snapshot folder or hub id) and an empty report for it."""
    given = os.fspath(source)
    where = Path(given)
    label = given
    if not where.exists() and _looks_like_hub_id(source):
        where = _download(given, revision)
        label = f"{given} (snapshot {where})"
    elif revision is not None:
        raise ValueError(f"revision={revision!r} applies to hub ids only, not to {given}")
    if where.is_dir():
        weights, files = _open_folder(model, where)
    elif where.exists():  # a FIFO or a device is refused by _Source, saying what it is
        weights = _Source(str(where))
        files = [weights.path]
    else:
        raise FileNotFoundError(f"checkpoint not found: {given}")
    return weights, LoadReport(path=label, files=files)


def _plan(
    model: nn.Module, weights: _Source, targets: dict[str, Tensor], report: LoadReport
) -> list[tuple[str, str]]:
    """(file key, model key) of every tensor to load; what does not fit goes into `report`."""
    path = weights.path  # names the file (or index) in the errors below
    plan: list[tuple[str, str]] = []
    planned: set[str] = set()
    for raw_key, shape in weights.shapes.items():
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
    return plan


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike,
    *,
    strict: bool = True,
    revision: str | None = None,
    copy: bool = False,
) -> LoadReport:
    """Load an official-layout checkpoint into `model` (a `VGGT`, before adapters are injected).

    source: a file (a plain state dict, `{"model": state_dict}` of trainer checkpoints, or
    safetensors); a snapshot folder (`model.safetensors`, else sharded safetensors named by
    `model.safetensors.index.json`, else `model.pt`; its `config.json`, when present, must agree
    with the model's img_size, patch_size and embed_dim); or, a str "owner/name" naming no local
    path, a hub id fetched with huggingface_hub's snapshot_download (the `[hub]` extra; `revision`,
    for hub ids only, passes through). Strips DDP's `module.` and maps peft names
    (`base_model.model.`, `.base_layer.`) back. Keys of heads the model does not have (the track head always; point / depth / camera heads when
    disabled) are skipped with a report line. Parameters on the meta device are replaced by the
    loaded tensors (no copy beyond the memory map), others are copied into in place.

    strict: raise ValueError if anything is missing, unexpected or mis-shaped, before any tensor is
    touched; otherwise the report lists it (and, in a meta-built model, whatever is missing stays on
    the meta device). Returns a LoadReport (print it for a summary).

    copy: give a meta-built model tensors of its own instead of views of the file's memory map
    (one tensor at a time, so the peak is still one model plus one tensor). Without it the model
    reads the checkpoint file for as long as it lives: writing over that file (torch.save to the
    same path) kills the process with SIGBUS and leaves the file unreadable. A model built on a
    real device always copies.
    """
    weights, report = _open_source(model, source, revision)
    targets = model.state_dict(keep_vars=True)
    plan = _plan(model, weights, targets, report)
    misfit = {key for key, _, _ in report.mismatched}
    planned = {key for _, key in plan}
    report.missing = [k for k in targets if k not in planned and k not in misfit]
    # Everything is checked before the first tensor is touched: a refused file changes nothing.
    if strict and not report.ok:
        raise ValueError(f"checkpoint does not fit the model:\n{report}")
    for raw_key, key in plan:
        _assign(model, key, targets[key], weights.get(raw_key), copy)
        report.loaded.append(key)
    # Buffers outside the state dict (image normalisation) must be real after a meta build.
    aggregator = getattr(model, "aggregator", None)
    if aggregator is not None and aggregator._resnet_mean.is_meta:
        aggregator.reset_constant_buffers(device="cpu")
    return report


def _assign(model: nn.Module, key: str, target: Tensor, tensor: Tensor, copy: bool) -> None:
    if not target.is_meta:
        with torch.no_grad():
            target.copy_(tensor)
        return
    owner, attr = _owner(model, key)
    value = tensor.to(target.dtype, copy=copy)
    if isinstance(target, nn.Parameter):
        owner.register_parameter(attr, nn.Parameter(value, requires_grad=target.requires_grad))
    else:
        owner.register_buffer(attr, value)


def load_pretrained(
    folder: str | os.PathLike, *, changes: dict | None = None, strict: bool = True
) -> tuple[VGGT, LoadReport]:
    """A model folder (config.json + model.safetensors, as `attrspace run` writes OUT/base/, or a
    snapshot folder) -> (VGGT built from its config.json, the LoadReport).

    The model is built on the meta device and receives the memory-mapped weights (no random
    initialisation, no second copy). changes: VGGTConfig fields to override that do not change
    shapes (e.g. {"gradient_checkpointing": True}). An official config.json (img_size,
    patch_size, embed_dim only) builds the VGGT-1B sizes with those values."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (a model folder holds {CONFIG_FILE})")
    config = VGGTConfig.load(folder / CONFIG_FILE)
    if changes:
        config = config.replace(**changes)
    with torch.device("meta"):
        model = VGGT(config)
    report = load_checkpoint(model, folder, strict=strict)
    return model, report
