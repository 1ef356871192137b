"""attrspace: subspace-constrained fine-tuning of 3D foundation models.

Importing the package loads neither triton nor the compiled extension attrspace._C; both are loaded
on first use by the backend that needs them. The names below are the public API; everything else is
reachable by its module path (docs/design.md says which modules are public) and carries no promise.
"""

from attrspace import backends
from attrspace.adapters.functional import SubspaceLinearFn, subspace_linear
from attrspace.adapters.inject import InjectionReport, inject, inject_lora, uninject
from attrspace.adapters.nn import LoRAConv2d, LoRALinear, SubspaceLinear
from attrspace.bank import BankFileError, LayerSubspace, SubspaceBank
from attrspace.export import (
    AdapterFileError,
    LoRAFactors,
    export_merged,
    export_peft,
    load_peft,
    load_peft_into,
    lora_state,
    save_peft,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # mine_peft writes figures and a report through the pipeline's report modules, whose import
    # (about 1 s) `import attrspace` should not pay: loaded on first use.
    if name == "mine_peft":
        from attrspace.pipeline.mine_loras import mine_peft

        return mine_peft
    raise AttributeError(f"module 'attrspace' has no attribute {name!r}")


__all__ = [  # noqa: RUF022 (grouped by role, not sorted)
    # adapter layers and their autograd function
    "LoRAConv2d",
    "LoRALinear",
    "SubspaceLinear",
    "SubspaceLinearFn",
    "subspace_linear",
    # putting adapters into a model and taking them out
    "InjectionReport",
    "inject",
    "inject_lora",
    "uninject",
    # the subspace bank
    "BankFileError",
    "LayerSubspace",
    "SubspaceBank",
    # peft folders and exports
    "AdapterFileError",
    "LoRAFactors",
    "export_merged",
    "export_peft",
    "load_peft",
    "load_peft_into",
    "lora_state",
    "save_peft",
    # mining a bank from your own peft LoRAs (any model)
    "mine_peft",
    # which kernels run: attrspace.backends() prints the status
    "backends",
]
