"""Linear algebra of the mining step: batched randomized SVD of dense and factored matrices, exact
factor-form SVD, principal angles and Frobenius norms of factored matrices by Gram traces."""

from .backends import BACKENDS, auto_backend
from .factored import factor_svd, factored_sq_distance, factored_sq_norm, principal_cosines
from .randomized import randomized_svd

__all__ = [
    "BACKENDS",
    "auto_backend",
    "factor_svd",
    "factored_sq_distance",
    "factored_sq_norm",
    "principal_cosines",
    "randomized_svd",
]
