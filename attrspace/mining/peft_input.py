"""Your own peft LoRAs as mining input, checked whole before any mining starts (docs/design.md §7).

A set of LoRAs is {attribute name: [adapter folders]}; on disk it is one folder per attribute:

    LORAS/<attribute>/<lora>/adapter_config.json + adapter_model.safetensors   (several per attribute)
    LORAS/<attribute>/adapter_config.json + adapter_model.safetensors          (one per attribute)

Attribute names are free (the folder names). Every folder must read as a peft LoRA adapter, and all
of them must adapt the same Linear layers with the same (d_out, d_in) per layer; ranks may differ
between LoRAs. Conv2d LoRA layers are left out (the bank adapts Linear layers) and reported. An
untrained LoRA (peft starts B at zero, so its update is zero) is refused: it would carry no
direction. Each refusal is one line naming the folder and, where it applies, the layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from attrspace.export.peft_folder import CONFIG_NAME, AdapterFileError, LoRAFactors, load_peft

Factors = tuple[Tensor, Tensor]


class LoRAInputError(AdapterFileError):
    """A LoRA folder or set of folders that cannot be mined."""


@dataclass
class LoRASet:
    """Checked mining input: the updates (`mine`'s argument) and what the report says about them."""

    updates: dict[str, dict[str, list[Factors]]]
    folders: dict[str, list[Path]]
    shapes: dict[str, tuple[int, int]]  # layer -> (d_out, d_in)
    ranks: dict[str, list[int]]  # attribute -> the largest LoRA rank of each folder
    skipped: list[str] = field(default_factory=list)  # layers left out (Conv2d LoRA)


def _adapter_folders(attribute_dir: Path) -> list[Path]:
    if (attribute_dir / CONFIG_NAME).is_file():
        return [attribute_dir]
    found, strays = [], []
    for entry in sorted(attribute_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / CONFIG_NAME).is_file():
            found.append(entry)
        else:
            strays.append(entry.name)
    if strays:
        raise LoRAInputError(
            f"{attribute_dir}: {strays[:4]} not peft adapter folders (each entry of an attribute "
            f"folder must be a folder holding {CONFIG_NAME})"
        )
    if not found:
        raise LoRAInputError(f"{attribute_dir}: holds no peft adapter folder ({CONFIG_NAME})")
    return found


def lora_folders(root: str | os.PathLike) -> dict[str, list[Path]]:
    """{attribute: adapter folders} from the layout ROOT/<attribute>/[<lora>/]adapter_config.json.
    Files directly in ROOT (a README) and hidden entries are not attributes and are passed over."""
    root = Path(root)
    if not root.is_dir():
        raise LoRAInputError(f"{root}: no such folder")
    attributes = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if (root / CONFIG_NAME).is_file():
        raise LoRAInputError(
            f"{root}: is one adapter folder; give the folder above it, one sub-folder per attribute"
        )
    if not attributes:
        raise LoRAInputError(f"{root}: holds no attribute folders (ROOT/<attribute>/<lora>/)")
    return {p.name: _adapter_folders(p) for p in attributes}


def _check_names(folders: dict) -> None:
    if not isinstance(folders, dict) or not folders:
        raise LoRAInputError("give at least one attribute: {name: [peft adapter folders]}")
    seen: dict[Path, str] = {}
    for attribute, paths in folders.items():
        if not isinstance(attribute, str) or not attribute.strip() or "|" in attribute:
            raise LoRAInputError(
                f"attribute name {attribute!r}: must be a non-empty string without '|'"
            )
        if isinstance(paths, str | os.PathLike) or not list(paths):
            raise LoRAInputError(f"attribute {attribute!r}: give a non-empty list of folders")
        for path in paths:
            resolved = Path(path).resolve()
            if not resolved.is_dir():
                raise LoRAInputError(f"{path}: no such folder (attribute {attribute!r})")
            if resolved in seen:
                raise LoRAInputError(
                    f"{path}: listed twice (attributes {seen[resolved]!r} and {attribute!r})"
                )
            seen[resolved] = attribute


def _linear_layers(path: Path, wanted: set[str] | None) -> tuple[dict[str, LoRAFactors], list]:
    try:
        factors = load_peft(path)
    except AdapterFileError as exc:  # its message names the file
        raise LoRAInputError(str(exc)) from exc
    except (OSError, ValueError, TypeError) as exc:
        raise LoRAInputError(f"{path}: cannot be read as a peft LoRA adapter ({exc})") from exc
    linear = {n: f for n, f in factors.items() if f.A.ndim == 2}
    skipped = sorted(set(factors) - set(linear))
    if wanted is not None:
        linear = {n: f for n, f in linear.items() if n in wanted}
    if not linear:
        raise LoRAInputError(f"{path}: adapts no Linear layer to mine" + _among(wanted))
    if all(float(f.B.abs().max()) == 0.0 for f in linear.values()):
        raise LoRAInputError(
            f"{path}: every lora_B is zero, so the update is zero (an untrained LoRA?)"
        )
    return linear, skipped


def _among(wanted: set[str] | None) -> str:
    return "" if wanted is None else f" among the {len(wanted)} layers asked for"


def _compare(path: Path, layers: dict[str, LoRAFactors], ref: Path, shapes: dict) -> None:
    missing, extra = sorted(set(shapes) - set(layers)), sorted(set(layers) - set(shapes))
    if missing or extra:
        raise LoRAInputError(
            f"{path}: adapts other layers than {ref}: missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}, extra {extra[:3]}"
            f"{' ...' if len(extra) > 3 else ''} (every LoRA must adapt the same layers)"
        )
    for name, f in layers.items():
        shape = (f.B.shape[0], f.A.shape[1])
        if shape != shapes[name]:
            raise LoRAInputError(
                f"{path}: layer {name} is {shape[0]} x {shape[1]} (d_out x d_in), "
                f"{ref} has {shapes[name][0]} x {shapes[name][1]}"
            )


def load_lora_set(
    folders: dict[str, list[str | os.PathLike]], layers: list[str] | None = None
) -> LoRASet:
    """Read and check every folder (see the module docstring); LoRAInputError names the first
    folder that does not fit. `layers`: mine only these layer names."""
    _check_names(folders)
    wanted = None if layers is None else set(layers)
    updates, ranks, shapes, skipped = {}, {}, {}, set()
    ref = None
    for attribute, paths in folders.items():
        per_layer: dict[str, list[Factors]] = {}
        ranks[attribute] = []
        for path in map(Path, paths):
            linear, left_out = _linear_layers(path, wanted)
            skipped.update(left_out)
            if ref is None:
                ref = path
                shapes = {n: (f.B.shape[0], f.A.shape[1]) for n, f in linear.items()}
            _compare(path, linear, ref, shapes)
            ranks[attribute].append(max(f.rank for f in linear.values()))
            for name, f in linear.items():
                per_layer.setdefault(name, []).append(f.left_right())
        updates[attribute] = per_layer
    if wanted is not None and wanted - set(shapes):
        raise LoRAInputError(f"layers asked for but in no LoRA: {sorted(wanted - set(shapes))[:4]}")
    as_paths = {a: [Path(p) for p in ps] for a, ps in folders.items()}
    return LoRASet(updates, as_paths, dict(sorted(shapes.items())), ranks, sorted(skipped))
