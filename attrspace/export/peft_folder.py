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
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import regex
import torch
from safetensors.torch import save
from torch import Tensor, nn

from attrspace.adapters.nn import LoRAConv2d, LoRALinear
from attrspace.util.checks import positive_finite, positive_int
from attrspace.util.files import (
    BadFileError,
    atomic_write_bytes,
    parse_json,
    read_safetensors,
    read_text,
)
from attrspace.util.folders import fsync_path, staged_folder

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_README = "README.md"  # peft writes a model card; kept when a folder is replaced
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
# Wall-clock budget of all the regex matching of one adapter folder. Honest patterns match a module
# name in microseconds; one that backtracks catastrophically would take years (see _Patterns).
MATCH_BUDGET_S = 2.0
# An adapter config is a few kilobytes; a megabyte leaves room for a rank_pattern per layer.
_CONFIG_LIMIT = 1 << 20
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
    for key, t in tensors.items():  # named by layer here: the read-back below sees a temp folder
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            match = _KEY.match(key)
            layer = f"layer {match.group(1)}: lora_{match.group(2)}" if match else key
            raise ValueError(f"{layer} holds NaN or Inf; nothing was written to {folder}")
    with staged_folder(folder) as tmp:
        # save() + atomic_write_bytes, not save_file: a full disk is an OSError naming the file
        # (safetensors' own writer raises a SafetensorError, a bare write names no file).
        data = save(tensors, metadata={"format": "pt", **(metadata or {})})
        atomic_write_bytes(tmp / WEIGHTS_NAME, data)
        atomic_write_bytes(tmp / CONFIG_NAME, text.encode())
        for path in keep:
            shutil.copy2(path, tmp / path.name)
        for path in tmp.iterdir():
            fsync_path(path)
        try:
            load_peft(tmp)  # what was written reads back as a consistent adapter
        except AdapterFileError as exc:
            raise AdapterFileError(str(exc).replace(str(tmp), str(folder))) from exc
        fsync_path(tmp)
    return folder


class _Patterns:
    """target_modules (when a regex) and the rank_pattern / alpha_pattern keys of one config,
    compiled once and matched as peft does (`re.fullmatch(target_modules, name)`,
    `re.match(rf"(.*\\.)?({key})$", name)`).

    A pattern `re` cannot compile is an AdapterFileError naming the key. Matching is bounded in
    time rather than by rules on the pattern's shape: a shape rule (no nested quantifiers) would
    refuse honest patterns such as `(?:\\w+\\.)*qkv` and still pass slow ones such as `.*.*.*.*x`.
    So the patterns are matched with the `regex` module (re's syntax; it avoids much of the
    backtracking and takes a timeout), all of one folder's matches sharing MATCH_BUDGET_S; a
    pattern that runs out is an AdapterFileError naming it, never a hang."""

    def __init__(self, path: Path, config: dict) -> None:
        self.path = path
        self.deadline = time.monotonic() + MATCH_BUDGET_S
        targets = config["target_modules"]
        self.targets = (
            self._compile("target_modules", targets, targets) if isinstance(targets, str) else None
        )
        self.listed = targets if isinstance(targets, list) else []
        self.patterns = {
            key: [
                (self._compile(f"{key}[{k!r}]", k, rf"(.*\.)?({k})$"), k, v)
                for k, v in (config.get(key) or {}).items()
            ]
            for key in ("rank_pattern", "alpha_pattern")
        }

    def _compile(self, what: str, pattern: str, full: str):
        for text in dict.fromkeys((pattern, full)):
            try:
                re.compile(text)  # what peft compiles
            except (re.error, RecursionError, OverflowError) as exc:
                raise AdapterFileError(
                    f"{self.path}: {what} is not a valid regular expression ({exc}); fix or "
                    "remove it"
                ) from None
        try:
            return regex.compile(full)
        except (regex.error, RecursionError, OverflowError) as exc:
            raise AdapterFileError(f"{self.path}: {what} cannot be matched ({exc})") from None

    def _run(self, compiled, method: str, name: str, what: str):
        left = self.deadline - time.monotonic()
        try:
            return getattr(compiled, method)(name, timeout=max(left, 1e-3))
        except TimeoutError:
            raise AdapterFileError(
                f"{self.path}: {what} {compiled.pattern!r} did not finish matching the module "
                f"names within {MATCH_BUDGET_S:g} s (catastrophic backtracking); write it without "
                "nested repetition, or list the module names"
            ) from None

    def targeted(self, name: str) -> bool:
        """Whether target_modules (list of names / dotted ends, or one regex) selects `name`."""
        if self.targets is not None:
            return self._run(self.targets, "fullmatch", name, "target_modules") is not None
        return any(_ends_with(name, t) for t in self.listed)

    def value(self, key: str, name: str, default):
        """peft's rank_pattern / alpha_pattern: the first key whose regex matches the name's
        dotted end."""
        for compiled, k, value in self.patterns[key]:
            if self._run(compiled, "match", name, f"{key}[{k!r}]") is not None:
                return value
        return default


def _ends_with(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _read_config(path: Path) -> dict:
    try:
        config = parse_json(read_text(path, limit=_CONFIG_LIMIT), str(path))
    except BadFileError as exc:
        if isinstance(exc.__cause__, json.JSONDecodeError):
            cause = exc.__cause__
            raise AdapterFileError(f"{path}: the adapter config is not JSON ({cause})") from None
        raise AdapterFileError(str(exc)) from None
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read the adapter config ({exc})") from exc
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


def _check_targets(folder: Path, config: dict, names) -> _Patterns:
    """The config's patterns, once target_modules and the weights are found to name the same
    modules."""
    patterns = _Patterns(folder / CONFIG_NAME, config)
    untargeted = sorted(n for n in names if not patterns.targeted(n))
    unused = sorted(t for t in patterns.listed if not any(_ends_with(n, t) for n in names))
    if untargeted or unused:
        raise AdapterFileError(
            f"{folder}: {CONFIG_NAME} and {WEIGHTS_NAME} name different modules: "
            f"weights of modules not in target_modules {untargeted[:8]}, "
            f"target_modules without weights {unused[:8]}"
        )
    return patterns


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
    patterns = _check_targets(folder, config, parts)
    return _lora_factors(folder, config, parts, patterns)


def load_saved_modules(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of the folder's modules_to_save, by plain key (`head.weight`)."""
    folder = Path(folder)
    config = _read_config(folder / CONFIG_NAME)
    try:
        tensors, _ = read_safetensors(folder / WEIGHTS_NAME)
    except ValueError as exc:
        raise AdapterFileError(str(exc)) from exc
    return _split_saved_modules(folder, config, tensors)


def _lora_factors(
    folder: Path, config: dict, parts: dict, patterns: _Patterns
) -> dict[str, LoRAFactors]:
    factors, problems = {}, []
    for name, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterFileError(
                f"{folder}: layer {name}: has only lora_{sorted(pair)}, needs A and B"
            )
        A, B = pair["A"], pair["B"]
        r = patterns.value("rank_pattern", name, config["r"])
        alpha = patterns.value("alpha_pattern", name, config["lora_alpha"])
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
        order = parse_json(metadata[TINYLORA_ORDER_KEY], f"{folder / WEIGHTS_NAME} metadata")
    except (KeyError, BadFileError):
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
