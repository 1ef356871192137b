"""Shared test setup.

Without a GPU the Triton kernels run in the interpreter, which must be switched on before
attrspace.kernels is first imported (@triton.jit reads TRITON_INTERPRET when it decorates).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
