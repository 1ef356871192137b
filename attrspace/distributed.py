"""Adapters on models wrapped for data-parallel training: DDP, FSDP2 (`fully_shard`), and FSDP1.

DDP needs nothing from here: only the trainable tensors (M, LoRA A/B) are all-reduced, and frozen
bases held as parameters are not re-broadcast each step (DDP broadcasts buffers, not parameters).
FSDP2 shards every parameter into a DTensor, so code that reads whole tensors (export, merge) must
gather them first; the helpers below do that, collectively: EVERY rank calls them, in the same
order, and rank 0 receives the result. FSDP1 is refused (see `check_wrapping`).

    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32
    )
    fully_shard_model(model, mp_policy=policy)   # after injection, before the optimizer
    ... train ...
    save_adapter(model, "adapter/")          # all ranks; rank 0 writes a plain peft folder
    state = merged_state_dict(model)         # all ranks; rank 0 gets the plain, folded state dict
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from attrspace.adapters.discovery import clean_name, plain_state, unwrap
from attrspace.adapters.nn import ADAPTER_TYPES, LoRAConv2d, LoRALinear, SubspaceLinear
from attrspace.export.writers import (
    collect_merged_state,
    collect_peft_adapter,
    modules_to_save,
    write_peft_adapter,
)
from attrspace.models.vggt.layers import Block


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def check_wrapping(model: nn.Module) -> None:
    """Refuse a model whose adapters sit inside FSDP1 (`FullyShardedDataParallel`).

    FSDP1 flattens a wrapped unit's parameters into one FlatParameter: with use_orig_params=False it
    refuses units that mix frozen and trainable parameters (every adapted layer does), and with
    use_orig_params=True the layer's frozen weight becomes a view of a trainable FlatParameter, so
    the frozen-weight contract of SubspaceLinear breaks. FSDP2 (`fully_shard`) keeps each
    parameter's own requires_grad and is the supported way to shard. Raises TypeError naming the
    FSDP1 unit and the first adapter inside it.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    for name, module in unwrap(model).named_modules():
        if not isinstance(module, FullyShardedDataParallel):
            continue
        inner = [n for n, m in module.named_modules() if isinstance(m, ADAPTER_TYPES)]
        if inner:
            where = clean_name(f"{name}.{inner[0]}" if name else inner[0])
            raise TypeError(
                f"attrspace adapters do not run under FSDP1 (FullyShardedDataParallel wraps "
                f"{where}); shard with FSDP2 instead: torch.distributed.fsdp.fully_shard, "
                f"e.g. attrspace.distributed.fully_shard_model(model)"
            )


def fsdp_units(
    model: nn.Module, block_types: tuple[type[nn.Module], ...] | None = None
) -> list[str]:
    """The submodules that get their own FSDP2 unit: every block, and every `*_head` child.

    block_types defaults to the package's VGGT `Block` (DINO, frame, global and camera-trunk
    blocks: 76 in VGGT-1B); the heads (camera, depth, point) are units of their own so the root
    unit keeps only embeddings and tokens. Names come parents first, as named_modules gives them.
    """
    if block_types is None:
        block_types = (Block,)
    heads = {n for n, _ in model.named_children() if n.endswith("_head")}
    return [n for n, m in model.named_modules() if n and (isinstance(m, block_types) or n in heads)]


def fully_shard_model(
    model: nn.Module,
    *,
    units: list[str] | None = None,
    mesh=None,
    mp_policy=None,
    reshard_after_forward: bool = True,
) -> list[str]:
    """Apply FSDP2 `fully_shard` to each unit of `model` (default `fsdp_units(model)`), then to
    `model` itself, and return the unit names.

    One unit per block is what lets FSDP2 gather one block's weights at a time and overlap the
    next gather with compute. Units are sharded innermost first (fully_shard must see a child
    before its parent). Call it after injection and before building the optimizer: fully_shard
    replaces every parameter by a DTensor shard. mp_policy: e.g. MixedPrecisionPolicy(
    param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32): bf16
    compute, fp32 master weights (M) and gradient reduction, and, from the root unit only, fp32
    predictions for the loss (inner units keep their outputs in param_dtype).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_wrapping(model)
    names = fsdp_units(model) if units is None else list(units)
    if not names:
        raise ValueError("the model has no FSDP unit (no block, no *_head child); pass units")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"units name no module of the model: {missing}")
    policy = MixedPrecisionPolicy() if mp_policy is None else mp_policy
    # Inner units hand their outputs on in param_dtype: the root's own layers (patch embedding,
    # norms) compute in param_dtype and refuse a float32 input. output_dtype is for the model's
    # predictions, so only the root applies it.
    inner = dataclasses.replace(policy, output_dtype=None)
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    for name in sorted(names, key=lambda n: n.count("."), reverse=True):
        fully_shard(modules[name], mp_policy=inner, **options)
    fully_shard(model, mp_policy=policy, **options)
    return names


def _full(t: Tensor) -> Tensor:
    """The whole tensor: an all-gather for a DTensor (collective), the tensor itself otherwise."""
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def _gather_adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor (U, V, M, lora_A/B weights) in full, as CPU tensors on rank 0, keyed
    `<module name>.<tensor name>` with module names as `unwrap(model).named_modules()` gives them
    (what attrspace.export.writers looks up); {} on other ranks. Collective: one all-gather per DTensor,
    in module order, which is the same on every rank."""
    keep = _rank() == 0
    out = {}
    for name, m in unwrap(model).named_modules():
        if isinstance(m, SubspaceLinear):
            tensors = {"U": m.U, "V": m.V, "M": m.M}
        elif isinstance(m, (LoRALinear, LoRAConv2d)):
            tensors = {"lora_A.weight": m.lora_A.weight, "lora_B.weight": m.lora_B.weight}
        else:
            continue
        for key, t in tensors.items():
            full = _full(t)
            if keep:
                out[f"{name}.{key}"] = full.cpu().clone()
    # The modules export_peft writes as peft's modules_to_save (trainable, outside the adapters).
    saved = tuple(f"{n}." for n in modules_to_save(model))
    for key, t in unwrap(model).state_dict(keep_vars=True).items():
        if clean_name(key).startswith(saved):
            full = _full(t)
            if keep:
                out[key] = full.cpu().clone()
    return out


def full_adapter_state(model: nn.Module) -> dict[str, dict]:
    """Every adapter's full tensors, gathered from FSDP2 shards, on rank 0 as CPU tensors.

    Collective under torch.distributed: every rank must call it; ranks other than 0 get {}.
    Works as well on a DDP-wrapped, compiled or plain model. Returns, by plain layer name:
      SubspaceLinear: {"kind": "subspace", "U": (d_out, K), "V": (d_in, K), "M": (K, K),
                       "scale": float, "merged": bool}
      LoRALinear / LoRAConv2d: {"kind": "lora", "lora_A": (r, d_in[, kh, kw]),
                       "lora_B": (d_out, r[, 1, 1]), "rank": int, "alpha": float, "scaling": float}
    Tensors keep their dtypes (M is float32 master weights under a bf16 FSDP2 policy).
    """
    check_wrapping(model)
    tensors = _gather_adapter_tensors(model)
    if _rank() != 0:
        return {}
    state: dict[str, dict] = {}
    for name, m in unwrap(model).named_modules():
        if isinstance(m, SubspaceLinear):
            entry = {"kind": "subspace", "scale": float(m.scale), "merged": bool(m.merged)}
            keys = {"U": "U", "V": "V", "M": "M"}
        elif isinstance(m, (LoRALinear, LoRAConv2d)):
            entry = {"kind": "lora", "rank": m.rank, "alpha": m.alpha, "scaling": m.scaling}
            keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
        else:
            continue
        entry.update({field: tensors[f"{name}.{key}"] for field, key in keys.items()})
        state[clean_name(name)] = entry
    return state


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict in the plain key layout with every adapter folded into its weight.

    Collective: every rank calls it; rank 0 gets the dict (CPU tensors), the others {}. Keys are
    those of the model before injection (no U, V, M, lora_A, lora_B), so the result loads with
    strict=True into a plain model or an official checkpoint's layout. The fold is
    attrspace.export.writers's (fp32 update, rounded once to the weight's dtype, as `uninject(merge=True)`);
    merged SubspaceLinear layers save their unmerged weight, so they are folded like the rest.
    This is merge + uninject for an FSDP2 model: load the result into a plain, unsharded model,
    or write it with `attrspace.export.write_merged_checkpoint`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    check_wrapping(model)
    inner = unwrap(model)
    # get_model_state_dict gathers one tensor at a time and keeps it on rank 0 only (cpu_offload),
    # so a 1B model never needs a full copy in every rank's memory. Its keys are plain names;
    # export looks tensors up by module names, wrapper segments included, so map them back.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    gathered = get_model_state_dict(inner, options=options)
    if _rank() != 0:
        return {}
    named = [*inner.named_parameters(remove_duplicate=False), *inner.named_buffers()]
    raw = {clean_name(n): n for n, _ in named}
    full = {raw.get(k, k): v for k, v in gathered.items()}
    return plain_state(collect_merged_state(inner, full))


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    format: str = "lora",
) -> Path:
    """Save every adapter of `model` as a plain peft LoRA folder, written by rank 0.

    The one call for "save my adapter" under DDP, FSDP2 or a single process: every rank calls it
    (adapter tensors are gathered collectively; the frozen base weights are not), rank 0 writes
    `folder` with attrspace.export.writers (subspace layers as rank-K LoRAs, or TinyLoRA with
    format="tinylora"; LoRA layers as they are; other trainable modules as modules_to_save), and
    every rank returns only once the folder is complete. If rank 0 fails, every rank raises the
    same RuntimeError, so no rank carries on believing the adapter was saved. Load it with
    `peft.PeftModel.from_pretrained(base_model, folder)`.
    """
    check_wrapping(model)
    inner = unwrap(model)
    wrapped = [n for n, m in inner.named_modules() if isinstance(m, ADAPTER_TYPES)]
    wrapped = [n for n in wrapped if clean_name(n) != n]
    if wrapped:
        # peft matches the names in adapter_config.json against the plain model's module names.
        raise ValueError(
            f"adapter {wrapped[0]!r} sits inside a wrapper module, so its peft name would not "
            "match the plain model; compile blocks in place (module.compile()) and checkpoint "
            "inside forward instead of wrapping"
        )
    tensors = _gather_adapter_tensors(model)
    folder = Path(folder)
    error, cause = None, None
    if _rank() == 0:
        try:
            adapter = collect_peft_adapter(inner, tensors, base_model_name_or_path, format)
            write_peft_adapter(adapter, folder)
        except Exception as exc:  # reported to every rank below, then raised
            error, cause = f"{type(exc).__name__}: {exc}", exc
    if dist.is_available() and dist.is_initialized():
        message = [error]
        dist.broadcast_object_list(message, src=0)  # also the barrier: rank 0 has finished
        error = message[0]
    if error is not None:
        raise RuntimeError(f"save_adapter: rank 0 could not write {folder}: {error}") from cause
    return folder
