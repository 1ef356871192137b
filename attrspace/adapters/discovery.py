"""Finding the adapters of a model, whatever wraps it: the one place that knows the wrappers.

Training scripts end holding a `torch.compile` object, a DDP module or a model with activation
checkpointing; exports and the sharding helpers must see the plain model and its plain key layout
(the layout of a checkpoint, of peft and of a strict load), never `_orig_mod.` or `module.` prefixes.
FSDP2 wraps in place (no name segment) and needs nothing here.
"""

from __future__ import annotations

from torch import Tensor, nn

from attrspace.adapters.nn import ADAPTER_TYPES

# Module-name segments that wrappers insert (torch.compile, activation checkpointing, FSDP1); a
# checkpoint key never contains them, so names are compared without them.
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model


def clean_name(name: str) -> str:
    """`name` without the segments that wrappers insert: the key layout of a plain model."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def plain_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` under the plain model's keys (wrapper segments removed); ValueError when two keys
    collapse to one."""
    out = {}
    for key, value in state.items():
        plain = clean_name(key)
        if plain in out:
            raise ValueError(f"two state-dict keys read {plain!r} once wrapper names are removed")
        out[plain] = value
    return out


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every SubspaceLinear / LoRALinear / LoRAConv2d by its plain qualified name, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {
        clean_name(name): m
        for name, m in unwrap(model).named_modules()
        if isinstance(m, ADAPTER_TYPES)
    }
