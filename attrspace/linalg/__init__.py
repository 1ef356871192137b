"""Linear algebra of the mining step: CholeskyQR (`orthonormalize`), exact factor-form SVD, principal
angles and Frobenius norms of factored matrices by Gram traces (`factored`), and the batched randomized
SVD of dense and factored matrices (`randomized`, which runs its steps on a backend of
attrspace.backends and so is imported from its module, not from here)."""

from attrspace.linalg.factored import (
    factor_svd,
    factored_sq_distance,
    factored_sq_norm,
    principal_cosines,
)

__all__ = [
    "factor_svd",
    "factored_sq_distance",
    "factored_sq_norm",
    "principal_cosines",
]
