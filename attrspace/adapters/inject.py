"""Swap adapter modules into a model by qualified name, and back.

Module instances are replaced (never classes patched), the whole plan is validated before the first swap
so a bad bank leaves the model untouched, and every original requires_grad flag is remembered so
`uninject` gives the model back as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from attrspace import backends
from attrspace.adapters.nn import (
    ADAPTER_TYPES,
    LoRAConv2d,
    LoRALinear,
    SubspaceLinear,
    conv_arguments,
)
from attrspace.bank import SubspaceBank
from attrspace.util.checks import positive_finite, positive_int, probability

_SAVED_FLAGS = "_attrspace_requires_grad"


@dataclass
class InjectionReport:
    """What an injection did: adapted layer names, trainable and total parameter counts."""

    kind: str
    layers: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (
            f"{self.kind}: {len(self.layers)} layers adapted, {self.trainable_params:,} trainable of "
            f"{self.total_params:,} parameters ({share:.3f}%)"
        )


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _built_or_untouched(model: nn.Module, build):
    """Run `build()` (which makes every new module, sharing and freezing base parameters); if it
    raises, put back every requires_grad flag, so a refused injection leaves the model as it was.

    The flags seen before the first injection are remembered for `uninject`.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    by_name = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        built = build()
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    if not hasattr(model, _SAVED_FLAGS):
        object.__setattr__(model, _SAVED_FLAGS, by_name)
    return built


def _swap_all(model: nn.Module, new_modules: dict[str, nn.Module]) -> None:
    for name, module in new_modules.items():
        _set_module(model, name, module)


def _freeze_all(model: nn.Module) -> None:
    """Freeze all but adapters.

    Adapters injected earlier stay trainable, so a bank on the blocks and LoRA on the heads compose.
    """
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, SubspaceLinear):
            module.M.requires_grad_(True)
        elif isinstance(module, (LoRALinear, LoRAConv2d)):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)


def _report(model: nn.Module, kind: str, layers: list[str]) -> InjectionReport:
    params = list(model.parameters())
    return InjectionReport(
        kind=kind,
        layers=layers,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
    )


def inject(
    model: nn.Module, bank: SubspaceBank, backend: str = "auto", scale: float | None = None
) -> InjectionReport:
    """Replace each nn.Linear named in `bank` by a SubspaceLinear; freeze every other parameter.

    Only the K x K matrices M train afterwards. `scale` defaults to the bank's scale. A bank that does
    not fit the model (missing name, not a plain nn.Linear, wrong shape) is refused with the list of
    every misfit, before anything is changed.
    """
    if not isinstance(bank, SubspaceBank):
        raise TypeError(f"bank must be a SubspaceBank, got {type(bank).__name__}")
    bank.validate()  # a bank edited after loading is checked again, layer by layer
    modules = dict(model.named_modules())
    problems = []
    for name, layer in bank.layers.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"{name}: no such module in the model")
        elif type(module) is not nn.Linear:
            problems.append(f"{name}: is {type(module).__name__}, expected a plain nn.Linear")
        elif (module.out_features, module.in_features) != (layer.d_out, layer.d_in):
            problems.append(
                f"{name}: model layer is {module.in_features}->{module.out_features}, "
                f"bank has {layer.d_in}->{layer.d_out}"
            )
    if problems:
        raise ValueError("the bank does not fit the model:\n  " + "\n  ".join(problems))
    s = bank.scale if scale is None else positive_finite("scale", scale, "inject")
    backends.preload(backend)
    new_modules = _built_or_untouched(
        model,
        lambda: {
            name: SubspaceLinear.from_linear(modules[name], layer.U, layer.V, s, backend)
            for name, layer in bank.layers.items()
        },
    )
    _freeze_all(model)
    _swap_all(model, new_modules)
    return _report(model, "subspace", list(bank.layers))


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(
    model: nn.Module,
    targets: Iterable[str] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    rank: int = 16,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> InjectionReport:
    """Wrap every plain nn.Linear / nn.Conv2d whose qualified name equals or ends with a target in LoRA.

    Targets are name suffixes on dot boundaries ("attn.qkv" matches "blocks.3.attn.qkv") or full names.
    Every other parameter is frozen. A target that matches no module raises ValueError.
    """
    rank = positive_int("rank", rank, "inject_lora")
    alpha = positive_finite("alpha", alpha, "inject_lora")
    dropout = probability("dropout", dropout, "inject_lora")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("targets is empty")
    if not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"targets must be non-empty strings, got {targets!r}")
    chosen, problems = [], []
    for name, module in model.named_modules():
        if not name or not _matches(name, targets):
            continue
        if type(module) in (nn.Linear, nn.Conv2d):
            chosen.append((name, module))
        elif not isinstance(module, ADAPTER_TYPES):
            problems.append(f"{name}: is {type(module).__name__}, expected nn.Linear or nn.Conv2d")
    unmatched = [t for t in targets if not any(_matches(n, [t]) for n, _ in chosen)]
    problems += [f"target {t!r} matches no nn.Linear or nn.Conv2d" for t in unmatched]
    if problems:
        raise ValueError("cannot inject LoRA:\n  " + "\n  ".join(problems))

    def build() -> dict[str, nn.Module]:
        return {
            name: (
                LoRALinear.from_linear(module, rank, alpha, dropout)
                if type(module) is nn.Linear
                else LoRAConv2d.from_conv(module, rank, alpha, dropout)
            )
            for name, module in chosen
        }

    new_modules = _built_or_untouched(model, build)
    _freeze_all(model)
    _swap_all(model, new_modules)
    return _report(model, "lora", [n for n, _ in chosen])


def _plain(module: nn.Module, merge: bool) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        plain = nn.Conv2d(**conv_arguments(module), device="meta")
    else:
        plain = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
    if merge:
        with torch.no_grad():
            delta = module.delta_weight().reshape(module.weight.shape)
            plain.weight = nn.Parameter(
                (module.weight.to(delta.dtype) + delta).to(module.weight.dtype)
            )
    else:
        plain.weight = module.weight
    plain.bias = module.bias
    return plain


def uninject(model: nn.Module, merge: bool = False) -> list[str]:
    """Replace every adapter by a plain nn.Linear / nn.Conv2d and restore requires_grad flags.

    merge=False gives back the very original weight and bias Parameters (bit-identical, the adapter is
    dropped); merge=True folds each adapter's update into a new weight. Returns the names replaced.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]
    merged = [
        n
        for n in names
        if isinstance(model.get_submodule(n), SubspaceLinear) and model.get_submodule(n).merged
    ]
    if merged:
        raise RuntimeError(
            f"{len(merged)} layers are merged ({', '.join(merged[:3])}{', ...' if len(merged) > 3 else ''});"
            " unmerge() them before uninject, or use uninject(merge=True) on unmerged layers to fold"
            " the updates"
        )
    # Every plain module is built before the first swap, so a failure leaves the model as it was.
    plain = {name: _plain(model.get_submodule(name), merge) for name in names}
    _swap_all(model, plain)
    flags = getattr(model, _SAVED_FLAGS, None)
    if flags is not None:
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
        object.__delattr__(model, _SAVED_FLAGS)
    return names
