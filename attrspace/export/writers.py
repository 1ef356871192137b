"""Ship a fine-tuned model: its adapters as a plain peft adapter folder, or one merged checkpoint.

`export_peft(model, folder)` writes every adapter of an injected model in peft's folder layout, so
`peft.PeftModel.from_pretrained(base_model, folder)` serves it with no attrspace installed:

- a SubspaceLinear (y = x W0^T + b + s x V M^T U^T) becomes a rank-K LoRA with A = V^T (K, d_in) and
  B = s U M (d_out, K), r = lora_alpha = K so that peft's scaling alpha / r is exactly 1;
- a LoRALinear / LoRAConv2d is written as it is (its r and alpha);
- every other trainable parameter (a head unfrozen after inject) goes in with its module as peft's
  modules_to_save (the module's whole state, as peft saves it); a trainable parameter that peft's
  folder cannot hold (on the root, on a module that holds adapters, a trainable weight or bias of an
  adapted layer, a module name whose end matches another module's) is refused by name.
With format="tinylora" the SubspaceLinear layers go in peft's TinyLoRA layout instead, in which
peft's trainable vector is M itself (`attrspace.export.tinylora`: its K^4 cost, its limits).
A compiled or DDP-wrapped model exports as the model inside it; an FSDP2-sharded one is refused
with a pointer to `attrspace.distributed.save_adapter`, which gathers the shards on every rank.
Layers of different (r, alpha) are told apart by exact rank_pattern / alpha_pattern keys. Dropout is
a training-time setting and is not carried (lora_dropout is 0). peft's LoRA of a Conv2d has no
dilation, so a dilated LoRAConv2d is refused (export_merged folds it instead).

`export_merged(model, path)` writes one safetensors checkpoint with every adapter folded into its
layer's weight (rounded once to the weight's dtype, as `uninject(merge=True)` does), under the keys the
un-adapted model has: for the VGGT model that is the official checkpoint layout, loadable with
`load_state_dict(..., strict=True)` into a fresh model.

Do not wrap an attrspace model in `peft.get_peft_model`: peft sets requires_grad False on every
parameter whose name is not a LoRA one, which freezes every M (the only trainable part of a
SubspaceLinear). Train with attrspace, then `export_peft` to go to peft; continue training there
with `PeftModel.from_pretrained(base, folder, is_trainable=True)`.

Both exports read the model and never change it. Each is two steps, so a sharded model can be
exported from gathered tensors: `collect_peft_adapter(model, state_dict)` /
`collect_merged_state(model, state_dict)` take the layer structure (names, ranks, scales) from
`model` and the tensors from `state_dict` (full tensors, keys as `model.state_dict()` gives them;
default: the model's own), and return plain CPU tensors; `write_peft_adapter(adapter, folder)` /
`write_merged_checkpoint(tensors, path)` validate and write them atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from attrspace.adapters.discovery import adapter_modules, clean_name, plain_state, unwrap
from attrspace.adapters.nn import LoRAConv2d, SubspaceLinear
from attrspace.export import tinylora
from attrspace.export.peft_folder import adapter_config, write_adapter_folder
from attrspace.util.files import atomic_path

_PREFIX = "base_model.model."
# Modules peft adds under each layer it adapts (LoRA or TinyLoRA) before it matches modules_to_save
# by the plain end of a name: a module to save whose name ends one of these ("out" ends
# "lora_dropout") would be matched there too.
_PEFT_CHILDREN = (
    "base_layer",
    "lora_A",
    "lora_A.default",
    "lora_B",
    "lora_B.default",
    "lora_dropout",
    "lora_dropout.default",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "tinylora_dropout",
    "tinylora_dropout.default",
    "tinylora_v",
    "tinylora_v.default",
)
# An adapter layer's own tensors, which the exported adapter carries (trainable or not).
_ADAPTER_TENSORS = frozenset({"M", "U", "V", "lora_A.weight", "lora_B.weight"})


@dataclass
class PeftAdapter:
    """A peft LoRA adapter in memory: tensors under peft's keys and the adapter_config.json dict."""

    tensors: dict[str, Tensor]
    config: dict
    metadata: dict[str, str] | None = None  # safetensors metadata (TinyLoRA's layer order)


def _adapters(model: nn.Module) -> dict[str, nn.Module]:
    layers = adapter_modules(model)
    if not layers:
        raise ValueError(
            "the model holds no attrspace adapters (SubspaceLinear, LoRALinear, LoRAConv2d)"
        )
    return layers


def _state(model: nn.Module, state_dict: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """The full state under the plain model's keys: a compiled or DDP-wrapped model exports exactly
    what the model inside it would."""
    return plain_state(unwrap(model).state_dict() if state_dict is None else state_dict)


def _full(state: dict[str, Tensor], key: str) -> Tensor:
    """state[key] as a plain CPU tensor, or an error naming the key and what is wrong with it."""
    if key not in state:
        raise ValueError(f"state_dict has no {key!r}")
    t = state[key]
    if not isinstance(t, Tensor):
        raise TypeError(f"state_dict[{key!r}] is a {type(t).__name__}, not a Tensor")
    if type(t).__name__ == "DTensor":
        raise ValueError(
            f"state_dict[{key!r}] is a sharded DTensor: gather full tensors first and pass them "
            "as state_dict (on rank 0)"
        )
    if t.device.type == "meta":
        raise ValueError(f"state_dict[{key!r}] is on the meta device (no data)")
    return t.detach().to("cpu")


def _finite(**tensors: Tensor) -> None:
    for label, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{label} holds NaN or Inf")


def _lora_parts(name: str, m: nn.Module, state: dict) -> tuple[Tensor, Tensor, int, float]:
    """(A, B, r, alpha) of a LoRA layer, with alpha / r equal to the layer's scaling."""
    A, B = _full(state, f"{name}.lora_A.weight"), _full(state, f"{name}.lora_B.weight")
    if isinstance(m, LoRAConv2d) and tuple(m.lora_A.dilation) != (1, 1):
        raise ValueError(
            f"peft's Conv2d LoRA has no dilation, this one has {m.lora_A.dilation}; "
            "use export_merged"
        )
    r, alpha = m.rank, m.alpha
    if alpha / r != m.scaling:
        # scaling was set apart from alpha (e.g. read from an rslora folder): fold it into B.
        B, alpha = B.to(torch.promote_types(B.dtype, torch.float32)) * m.scaling, r
    return A.contiguous(), B.contiguous(), r, alpha


def base_module_names(model: nn.Module) -> list[str]:
    """The module names peft sees in the un-adapted model: plain names, without the root and
    without the adapters' own sub-modules (lora_A, lora_B)."""
    inner = tuple(f"{n}." for n in adapter_modules(model))
    names = (clean_name(n) for n, _ in unwrap(model).named_modules())
    return [n for n in names if n and not n.startswith(inner)]


def _unsaveable(key: str, adapters: dict[str, nn.Module]) -> str | None:
    """Why trainable parameter `key` (plain name) cannot go into peft's folder; None when it is an
    adapter's own tensor or can be saved with its module as modules_to_save."""
    owner = key.rpartition(".")[0]
    for a in adapters:
        if key.startswith(f"{a}."):
            if key[len(a) + 1 :] in _ADAPTER_TENSORS:
                return None
            return f"{key} (a tensor of the adapted layer {a} beside its adapter)"
    if not owner:
        return f"{key} (a parameter of the model's root; modules_to_save holds whole sub-modules)"
    inside = next((a for a in adapters if a.startswith(f"{owner}.")), None)
    if inside is not None:
        return f"{key} (its module {owner} holds the adapter {inside}, which peft would copy)"
    return None


def modules_to_save(model: nn.Module) -> list[str]:
    """peft's modules_to_save for the model's trainable parameters outside its adapters (a head
    unfrozen after inject): the smallest module owning each, plain names. ValueError naming every
    trainable parameter that peft's folder cannot hold."""
    adapters = adapter_modules(model)
    owners, problems = set(), []
    for raw, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        key = clean_name(raw)
        problem = _unsaveable(key, adapters)
        if problem is not None:
            problems.append(problem)
        elif not any(key.startswith(f"{a}.") for a in adapters):
            owners.add(key.rpartition(".")[0])
    keep = sorted(o for o in owners if not any(o.startswith(f"{x}.") for x in owners))
    names = base_module_names(model) + [f"{a}.{s}" for a in adapters for s in _PEFT_CHILDREN]
    for t in keep:
        clash = next((o for o in names if o != t and o.endswith(t)), None)
        if clash is not None:
            problems.append(
                f"{t} (peft selects modules_to_save by the end of a name, so {t!r} would also "
                f"take {clash!r})"
            )
    if problems:
        raise ValueError(
            "trainable parameters that a peft folder cannot hold: "
            + "; ".join(problems[:4])
            + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            + " (freeze them before exporting, or use export_merged)"
        )
    return keep


def _check_unsharded(model: nn.Module) -> None:
    sharded = next((n for n, p in unwrap(model).named_parameters() if _is_dtensor(p)), None)
    if sharded is not None:
        raise ValueError(
            f"the model is sharded (FSDP2: {clean_name(sharded)} is a DTensor); call "
            "attrspace.distributed.save_adapter(model, folder) on every rank: it gathers the "
            "adapter tensors and rank 0 writes the folder"
        )


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def _subspace_parts(name: str, m: SubspaceLinear, state: dict) -> tuple[Tensor, Tensor]:
    U, V, M = (_full(state, f"{name}.{k}") for k in ("U", "V", "M"))
    acc = torch.float64 if M.dtype == torch.float64 else torch.float32
    return V.to(acc).t().contiguous(), (m.scale * (U.to(acc) @ M.to(acc))).contiguous()


def _lora_tensors(layers: dict, state: dict) -> tuple[dict[str, Tensor], dict]:
    tensors, ranks = {}, {}
    for name, m in layers.items():
        try:
            if isinstance(m, SubspaceLinear):
                A, B = _subspace_parts(name, m, state)
                r = alpha = A.shape[0]
            else:
                A, B, r, alpha = _lora_parts(name, m, state)
            _finite(lora_A=A, lora_B=B)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"export of layer {name}: {exc}") from exc
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = B
        ranks[name] = (r, alpha)
    return tensors, ranks


def _tinylora_adapter(layers: dict, state: dict, saved, base_model_name_or_path, names):
    lora = sorted(n for n, m in layers.items() if not isinstance(m, SubspaceLinear))
    if lora:
        raise ValueError(
            f"format='tinylora' holds SubspaceLinear layers only; {len(lora)} LoRA layers "
            f"({lora[0]}, ...) need format='lora'"
        )
    parts = {}
    for name, m in layers.items():
        try:
            U, V, M = (_full(state, f"{name}.{k}") for k in ("U", "V", "M"))
            _finite(U=U, V=V, M=M)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"export of layer {name}: {exc}") from exc
        parts[name] = (U, V, M, m.scale)
    tensors = tinylora.tinylora_tensors(parts)
    K = tinylora.check_ranks({n: p[2].shape[0] for n, p in parts.items()})
    config = tinylora.tinylora_config(list(parts), K, base_model_name_or_path, names, saved or None)
    return PeftAdapter(tensors, config, tinylora.order_metadata(list(parts)))


def collect_peft_adapter(
    model: nn.Module,
    state_dict: dict[str, Tensor] | None = None,
    base_model_name_or_path: str | None = None,
    format: str = "lora",
) -> PeftAdapter:
    """Every adapter of `model` as peft tensors (CPU) and config, with the model's other trainable
    modules as modules_to_save; see the module docstring. format: "lora" or "tinylora"."""
    if format not in ("lora", "tinylora"):
        raise ValueError(f"format must be 'lora' or 'tinylora', got {format!r}")
    layers = _adapters(model)
    saved = modules_to_save(model)
    if state_dict is None:
        _check_unsharded(model)
    state = _state(model, state_dict)
    names = base_module_names(model)
    if format == "tinylora":
        adapter = _tinylora_adapter(layers, state, saved, base_model_name_or_path, names)
    else:
        tensors, ranks = _lora_tensors(layers, state)
        config = adapter_config(ranks, base_model_name_or_path, module_names=names)
        config["modules_to_save"] = saved or None
        adapter = PeftAdapter(tensors, config)
    for key in sorted(k for k in state if any(k.startswith(f"{t}.") for t in saved)):
        try:
            adapter.tensors[f"{_PREFIX}{key}"] = _full(state, key).contiguous()
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"export of modules_to_save: {exc}") from exc
    return adapter


def write_peft_adapter(adapter: PeftAdapter, folder: str | os.PathLike) -> Path:
    """Write a collected adapter as a peft folder (temporary folder, read back, one rename)."""
    if not isinstance(adapter, PeftAdapter):
        raise TypeError(f"adapter must be a PeftAdapter, got {type(adapter).__name__}")
    return write_adapter_folder(adapter.tensors, adapter.config, folder, adapter.metadata)


def export_peft(
    model: nn.Module,
    folder: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    format: str = "lora",
) -> Path:
    """Write every adapter of `model` as a plain peft adapter folder; returns the folder.

    format "lora" (default): SubspaceLinear layers as rank-K LoRAs; "tinylora": peft's TinyLoRA
    layout, in which peft trains exactly M (`attrspace.export.tinylora`; K <= 32, one K for all
    layers, no LoRA layers). Other trainable parameters go in as peft's modules_to_save."""
    adapter = collect_peft_adapter(model, None, base_model_name_or_path, format)
    return write_peft_adapter(adapter, folder)


def _delta(name: str, m: nn.Module, state: dict, weight: Tensor) -> Tensor:
    """The layer's update in the accumulation dtype, computed as the module's delta_weight does."""
    if isinstance(m, SubspaceLinear):
        U, V, M = (_full(state, f"{name}.{k}") for k in ("U", "V", "M"))
        acc = M.dtype if M.dtype == torch.float64 else torch.float32
        return m.scale * (U.to(acc) @ M.to(acc) @ V.to(acc).t())
    A, B = _full(state, f"{name}.lora_A.weight"), _full(state, f"{name}.lora_B.weight")
    return (m.scaling * (B.flatten(1).float() @ A.flatten(1).float())).reshape(weight.shape)


def collect_merged_state(
    model: nn.Module, state_dict: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The un-adapted model's state dict with every adapter folded in (CPU tensors).

    Keys are those of the model before injection: each adapter contributes `<name>.weight` (merged)
    and `<name>.bias`; its own tensors (U, V, M, lora_A, lora_B) are dropped. `state_dict` must hold
    unmerged weights, as `model.state_dict()` gives them even for merged layers.
    """
    layers = _adapters(model)
    state = _state(model, state_dict)
    own = {f"{n}.weight" for n in layers} | {f"{n}.bias" for n in layers}
    prefixes = tuple(f"{n}." for n in layers)
    out = {}
    for key in state:
        if key.startswith(prefixes) and key not in own:
            continue
        try:
            out[key] = _full(state, key)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"merged export: {exc}") from exc
    for name, m in layers.items():
        try:
            weight = _full(state, f"{name}.weight")
            delta = _delta(name, m, state, weight)
            merged = (weight.to(delta.dtype) + delta).to(weight.dtype)
            _finite(merged_weight=merged)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"merged export of layer {name}: {exc}") from exc
        out[f"{name}.weight"] = merged
    return out


def write_merged_checkpoint(tensors: dict[str, Tensor], path: str | os.PathLike) -> Path:
    """Write a plain state dict as one safetensors file, atomically (temp file, fsync, rename).

    Written from the dict directly (no second copy in memory); tensors that share storage (tied
    weights) are copied apart, since safetensors stores each tensor once.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give the checkpoint's file name")
    if not tensors:
        raise ValueError("no tensors to write")
    seen, plain = set(), {}
    for key, t in tensors.items():
        if not isinstance(t, Tensor) or t.device.type != "cpu":
            raise TypeError(f"tensors[{key!r}] must be a CPU tensor")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        plain[key] = t.clone() if ptr in seen else t.contiguous()
        seen.add(ptr)
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata={"format": "pt"})
    return path


def export_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` with every adapter folded in as a plain safetensors checkpoint; returns path."""
    return write_merged_checkpoint(collect_merged_state(model), path)
