"""attrspace: subspace-constrained fine-tuning of 3D foundation models.

Importing the package loads neither triton nor the compiled extension attrspace._C; both are loaded
on first use by the backend that needs them.
"""

from . import backends
from .bank import BankFileError, LayerSubspace, SubspaceBank
from .export import export_merged, export_peft
from .functional import SubspaceLinearFn, subspace_linear
from .inject import InjectionReport, inject, inject_lora, uninject
from .nn import LoRAConv2d, LoRALinear, SubspaceLinear
from .peft_io import AdapterFileError, LoRAFactors, load_peft, load_peft_into, lora_state, save_peft

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "BankFileError",
    "InjectionReport",
    "LayerSubspace",
    "LoRAConv2d",
    "LoRAFactors",
    "LoRALinear",
    "SubspaceBank",
    "SubspaceLinear",
    "SubspaceLinearFn",
    "backends",
    "export_merged",
    "export_peft",
    "inject",
    "inject_lora",
    "load_peft",
    "load_peft_into",
    "lora_state",
    "save_peft",
    "subspace_linear",
    "uninject",
]
