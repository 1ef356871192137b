"""Lazy access to the compiled extension attrspace._C.

The extension is imported on first use, never at `import attrspace`, so a machine without a compiler,
without CUDA or with a broken build still imports the package. The outcome (module or failure reason) is
cached: later calls answer at once, and `attrspace.backends()` prints the reason.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module("attrspace._C")
    except ImportError as exc:  # not built, or built for another Python
        return None, f"attrspace._C could not be imported ({exc})"
    return module, None


def native() -> ModuleType | None:
    """The extension module, or None when it is absent (see `native_unavailable_reason`)."""
    return _load()[0]


def native_unavailable_reason() -> str | None:
    return _load()[1]


def cuda_unavailable_reason() -> str | None:
    """None when the extension was built with its CUDA part, else why not."""
    module, reason = _load()
    if module is None:
        return reason
    info = module.build_info()
    if not info["built_with_cuda"]:
        if info.get("cuda_request") == "OFF":
            return "attrspace._C was built without CUDA (ATTRSPACE_CUDA=OFF at build time)"
        return "attrspace._C was built without CUDA (nvcc was not found at build time)"
    return None
