"""The subspace bank: per-layer frozen bases (U, V) and scales, its safetensors file format (ours and the
official release's layout) and the checks a bank passes before any layer is built. See docs/design.md,
"The bank"."""

from attrspace.bank.subspace_bank import (
    BankFileError,
    LayerSubspace,
    SubspaceBank,
    linear_shapes,
    random_bank,
    upgrade_v1_file,
)

__all__ = [
    "BankFileError",
    "LayerSubspace",
    "SubspaceBank",
    "linear_shapes",
    "random_bank",
    "upgrade_v1_file",
]
