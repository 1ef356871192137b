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
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from attrspace.adapters.nn import LoRAConv2d, LoRALinear
from attrspace.util.checks import positive_finite, positive_int
from attrspace.util.files import read_safetensors
from attrspace.util.folders import fsync_path, staged_folder

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_README = "README.md"  # peft writes a model card; kept when a folder is replaced
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
_TINY_KEY = re.compile(r"^base_model\.model\.(.+)\.tinylora_([ABP])$")
_TINY_V = re.compile(r"^base_model\.tinylora_v\.(\d+)$")
# safetensors metadata of a TinyLoRA folder written here: the layers in peft's order of v.
TINYLORA_ORDER_KEY = "attrspace_tinylora_layers"


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
    """Write the LoRA adapters of `model` as a peft adapter folder (see `write_adapter_folder`).

    Layers of another (r, alpha) than the most common one go into rank_pattern / alpha_pattern.
    attrspace.export_peft also writes SubspaceLinear layers (as rank-K LoRA).
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))}
    if not layers:
        raise ValueError("the model holds no LoRA layers (inject_lora first)")
    tensors = {}
    for name, m in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    config = adapter_config(
        {n: (m.rank, m.alpha) for n, m in layers.items()},
        base_model_name_or_path,
        module_names=[n for n, _ in model.named_modules()],
    )
    return write_adapter_folder(tensors, config, folder)


def adapter_config(
    layers: dict[str, tuple[int, float]],
    base_model_name_or_path: str | None = None,
    module_names: list[str] | None = None,
) -> dict:
    """adapter_config.json for LoRA layers {module name: (r, lora_alpha)}, as plain peft reads it.

    r / lora_alpha are the most common pair; other layers get exact rank_pattern / alpha_pattern
    keys (`^` + escaped full name: peft matches keys by regex on a name's dotted end, and the anchor
    keeps "attn.qkv" from also matching "blocks.0.attn.qkv"). target_modules is the list of full
    names, or one exact regex when a name is the dotted end of another module name of the model
    (peft's list matching would adapt that module too).
    """
    if not layers:
        raise ValueError("no LoRA layers to describe")
    for name, (r, alpha) in layers.items():
        positive_int("r", r, f"layer {name}")
        positive_finite("lora_alpha", alpha, f"layer {name}")
    pairs = Counter(layers.values())
    r0, alpha0 = max(sorted(pairs), key=lambda pair: pairs[pair])
    targets = target_modules(list(layers), module_names)
    return {
        "peft_type": "LORA",
        "r": r0,
        "lora_alpha": alpha0,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {_exact(n): r for n, (r, _) in sorted(layers.items()) if r != r0},
        "alpha_pattern": {_exact(n): a for n, (_, a) in sorted(layers.items()) if a != alpha0},
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": None,
    }


def target_modules(names: list[str], module_names: list[str] | None = None) -> list[str] | str:
    """peft's target_modules selecting exactly `names`: the sorted list of full names, or one exact
    regex when a name is the dotted end of another module's name (peft's list matching would
    adapt that module too)."""
    names = sorted(names)
    others = set(module_names or ()) | set(names)
    ambiguous = any(o != n and o.endswith("." + n) for n in names for o in others)
    return "(?:" + "|".join(re.escape(n) for n in names) + ")" if ambiguous else names


def _exact(name: str) -> str:
    return "^" + re.escape(name)


def write_adapter_folder(
    tensors: dict[str, Tensor],
    config: dict,
    folder: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write weights and config into a new temporary folder, then rename it to `folder` in one step.

    An existing adapter folder is moved aside only once the new one is complete, and removed after
    the rename, so a failed write leaves the old folder as it was (never new weights under an old
    config). A folder that holds files other than an adapter's is refused, not replaced. The files
    are checked by reading them back (`load_peft`) before the rename.
    """
    folder = Path(folder)
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder")
    keep = []
    if folder.is_dir():
        present = {p.name for p in folder.iterdir()}
        foreign = sorted(present - {CONFIG_NAME, WEIGHTS_NAME, _README})
        if foreign:
            raise ValueError(
                f"{folder}: holds files that are not part of an adapter ({foreign[:5]}); "
                "choose an empty folder or an adapter folder to replace"
            )
        keep = [folder / _README] if _README in present else []
    text = json.dumps(config, indent=2, allow_nan=False)
    with staged_folder(folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **(metadata or {})})
        (tmp / CONFIG_NAME).write_text(text)
        for path in keep:
            shutil.copy2(path, tmp / path.name)
        for path in tmp.iterdir():
            fsync_path(path)
        load_peft(tmp)  # what was written reads back as a consistent adapter
        fsync_path(tmp)
    return folder


def _pattern_value(name: str, pattern: dict, default):
    """peft's rank_pattern / alpha_pattern: the first key whose regex matches the name's dotted end."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _targets(name: str, targets) -> bool:
    """Whether peft's `target_modules` (list of names / dotted ends, or one regex) selects `name`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _read_config(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
        config = json.loads(text)
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read the adapter config ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise AdapterFileError(f"{path}: the adapter config is not UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path}: the adapter config is not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterFileError(
            f"{path}: the adapter config must be a JSON object, got a {type(config).__name__}"
        )
    kind = config.get("peft_type")
    if kind not in ("LORA", "TINYLORA"):
        raise AdapterFileError(f"{path}: peft_type is {kind!r}, expected 'LORA' or 'TINYLORA'")
    try:
        (_check_lora_config if kind == "LORA" else _check_tinylora_config)(path, config)
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(str(exc)) from exc
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets)) or (
        isinstance(targets, list) and not all(isinstance(t, str) for t in targets)
    ):
        raise AdapterFileError(
            f"{path}: target_modules must be a regex or a non-empty list of names, got {targets!r}"
        )
    saved = config.get("modules_to_save")
    if saved is not None and not (
        isinstance(saved, list) and all(isinstance(t, str) and t for t in saved)
    ):
        raise AdapterFileError(f"{path}: modules_to_save must be a list of names, got {saved!r}")
    return config


def _check_lora_config(path: Path, config: dict) -> None:
    positive_int("r", config.get("r"), str(path))
    positive_finite("lora_alpha", config.get("lora_alpha"), str(path))
    for key, check in (("rank_pattern", positive_int), ("alpha_pattern", positive_finite)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise TypeError(f"{key} ({path}) must be a JSON object, got {pattern!r}")
        for k, v in pattern.items():
            check(f"{key}[{k!r}]", v, str(path))
    for key in ("use_rslora", "use_dora"):
        if not isinstance(config.get(key, False), bool):
            raise TypeError(f"{key} ({path}) must be true or false, got {config[key]!r}")
    if config.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters are not plain LoRA and cannot be read")


def _check_tinylora_config(path: Path, config: dict) -> None:
    positive_int("r", config.get("r"), str(path))
    positive_int("u", config.get("u"), str(path))
    if config.get("weight_tying", 0.0) != 0.0:
        raise ValueError(f"{path}: weight_tying {config['weight_tying']} (shared v) is not read")
    if config.get("save_projection") is not True:
        raise ValueError(
            f"{path}: save_projection is not true: the projections P are regenerated from a seed "
            "by peft and are not in the file, so the update cannot be read here"
        )


def _split_saved_modules(folder: Path, config: dict, tensors: dict) -> dict[str, Tensor]:
    """Pop the tensors of config's modules_to_save (`base_model.model.<module>.<tensor>`) out of
    `tensors`; every listed module must have some and they must be finite."""
    names = config.get("modules_to_save") or []
    saved = {}
    for key in list(tensors):
        rest = key.removeprefix(_PREFIX)
        if rest != key and any(rest.startswith(t + ".") for t in names):
            saved[rest] = tensors.pop(key)
    empty = [t for t in names if not any(k.startswith(t + ".") for k in saved)]
    if empty:
        raise AdapterFileError(f"{folder}: modules_to_save {empty[:4]} have no tensors in the file")
    bad = [k for k, t in saved.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterFileError(f"{folder}: saved module tensors {bad[:4]} hold NaN or Inf")
    return saved


def _check_targets(folder: Path, config: dict, names) -> None:
    targets = config["target_modules"]
    untargeted = sorted(n for n in names if not _targets(n, targets))
    unused = []
    if isinstance(targets, list):
        unused = sorted(t for t in targets if not any(_targets(n, [t]) for n in names))
    if untargeted or unused:
        raise AdapterFileError(
            f"{folder}: {CONFIG_NAME} and {WEIGHTS_NAME} name different modules: "
            f"weights of modules not in target_modules {untargeted[:8]}, "
            f"target_modules without weights {unused[:8]}"
        )


def load_peft(folder: str | os.PathLike) -> dict[str, LoRAFactors]:
    """Read a peft LoRA (or TinyLoRA) adapter folder into factors by module name, validating
    every layer.

    The config and the weights must describe the same modules (every weight's module selected by
    target_modules, every listed target present in the weights) with the same ranks; tensors of
    modules_to_save are checked (`load_saved_modules` returns them). A TinyLoRA folder reads as
    A = tinylora_A, B = tinylora_B R with R = sum_i v_i P_i, scale 1.
    """
    folder = Path(folder)
    config = _read_config(folder / CONFIG_NAME)
    try:
        tensors, metadata = read_safetensors(folder / WEIGHTS_NAME)
    except ValueError as exc:
        raise AdapterFileError(str(exc)) from exc
    _split_saved_modules(folder, config, tensors)
    if config["peft_type"] == "TINYLORA":
        return _tinylora_factors(folder, config, tensors, metadata)
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterFileError(f"{folder / WEIGHTS_NAME}: key {key!r} is not a LoRA A/B weight")
        parts.setdefault(match.group(1), {})[match.group(2)] = t
    if not parts:
        raise AdapterFileError(f"{folder / WEIGHTS_NAME}: holds no LoRA weights")
    _check_targets(folder, config, parts)
    return _lora_factors(folder, config, parts)


def load_saved_modules(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of the folder's modules_to_save, by plain key (`head.weight`)."""
    folder = Path(folder)
    config = _read_config(folder / CONFIG_NAME)
    try:
        tensors, _ = read_safetensors(folder / WEIGHTS_NAME)
    except ValueError as exc:
        raise AdapterFileError(str(exc)) from exc
    return _split_saved_modules(folder, config, tensors)


def _lora_factors(folder: Path, config: dict, parts: dict) -> dict[str, LoRAFactors]:
    factors, problems = {}, []
    for name, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterFileError(
                f"{folder}: layer {name}: has only lora_{sorted(pair)}, needs A and B"
            )
        A, B = pair["A"], pair["B"]
        r = _pattern_value(name, config.get("rank_pattern") or {}, config["r"])
        alpha = _pattern_value(name, config.get("alpha_pattern") or {}, config["lora_alpha"])
        if A.ndim not in (2, 4) or B.ndim != A.ndim or A.shape[0] != r or B.shape[1] != r:
            problems.append(
                f"layer {name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit rank {r}"
            )
            continue
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterFileError(f"{folder}: layer {name}: factors hold NaN or Inf")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors[name] = LoRAFactors(A, B, float(scale))
    if problems:
        raise AdapterFileError(
            f"{folder}: weights and {CONFIG_NAME} disagree on ranks:\n  " + "\n  ".join(problems)
        )
    return factors


def _tinylora_layers(folder: Path, tensors: dict) -> tuple[dict, dict]:
    """{layer: {"A", "B", "P": tensor}} and {index: v} from peft's TinyLoRA keys."""
    parts: dict[str, dict[str, Tensor]] = {}
    vs: dict[int, Tensor] = {}
    for key, t in tensors.items():
        match = _TINY_KEY.match(key)
        vmatch = _TINY_V.match(key)
        if match is not None:
            parts.setdefault(match.group(1), {})[match.group(2)] = t
        elif vmatch is not None:
            vs[int(vmatch.group(1))] = t
        else:
            raise AdapterFileError(f"{folder / WEIGHTS_NAME}: key {key!r} is not a TinyLoRA tensor")
    if not parts:
        raise AdapterFileError(f"{folder / WEIGHTS_NAME}: holds no TinyLoRA layers")
    return parts, vs


def _tinylora_order(folder: Path, parts: dict, vs: dict, metadata: dict) -> list[str]:
    """The layers in peft's order of v (the model's module order), as attrspace records it."""
    try:
        order = json.loads(metadata[TINYLORA_ORDER_KEY])
    except (KeyError, json.JSONDecodeError):
        raise AdapterFileError(
            f"{folder}: a TinyLoRA folder without attrspace's layer order: v is indexed by the "
            "model's module order, which the folder alone does not give"
        ) from None
    if sorted(order) != sorted(parts) or sorted(vs) != list(range(len(order))):
        raise AdapterFileError(
            f"{folder}: {len(parts)} TinyLoRA layers, {len(vs)} vectors v and a recorded order of "
            f"{len(order)} layers do not agree"
        )
    return order


def _tinylora_factors(folder: Path, config: dict, tensors: dict, metadata: dict) -> dict:
    parts, vs = _tinylora_layers(folder, tensors)
    _check_targets(folder, config, parts)
    order = _tinylora_order(folder, parts, vs, metadata)
    r, u = config["r"], config["u"]
    factors = {}
    for index, name in enumerate(order):
        layer, v = parts[name], vs[index]
        if set(layer) != {"A", "B", "P"}:
            raise AdapterFileError(f"{folder}: layer {name}: needs tinylora_A, _B and _P")
        A, B, P = layer["A"], layer["B"], layer["P"]
        if A.ndim != 2 or A.shape[0] != r or B.ndim != 2 or B.shape[1] != r:
            raise AdapterFileError(
                f"{folder}: layer {name}: A {tuple(A.shape)}, B {tuple(B.shape)} do not fit r {r}"
            )
        if tuple(P.shape) != (u, r, r) or tuple(v.shape) != (u,):
            raise AdapterFileError(
                f"{folder}: layer {name}: P {tuple(P.shape)} and v {tuple(v.shape)} do not fit "
                f"u {u}, r {r}"
            )
        R = torch.einsum("i,ijk->jk", v.double(), P.double())
        B_R = (B.double() @ R).to(B.dtype)
        if not all(bool(torch.isfinite(t).all()) for t in (A, B_R)):
            raise AdapterFileError(f"{folder}: layer {name}: tensors hold NaN or Inf")
        factors[name] = LoRAFactors(A, B_R, 1.0)
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
