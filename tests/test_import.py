"""Import stays lean; the backends report says what is available and why not."""

import os
import shutil
import subprocess
import sys

import attrspace


def test_import_loads_neither_the_kernels_nor_the_extension():
    # torch itself may import triton; what matters is that attrspace adds no kernel or native module.
    code = (
        "import sys, torch; before = set(sys.modules); import attrspace; "
        "print(sorted(m for m in set(sys.modules) - before if 'kernels' in m or '_C' in m "
        "or m.endswith(('triton_backend', 'cuda_backend', 'cupy_jit')) or m.startswith('triton')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"


def test_backends_report():
    report = attrspace.backends()
    assert set(report) == {"torch", "triton", "cuda"}
    assert report["torch"] == "available"
    for name, status in report.items():
        assert status == "available" or len(status) > 10, (name, status)


def test_extension_build_matches_the_machine():
    from attrspace.backends.native import native, native_unavailable_reason

    module = native()
    assert module is not None, native_unavailable_reason()
    info = module.build_info()
    # With ATTRSPACE_CUDA=AUTO (the default) the build has its CUDA part exactly when nvcc exists.
    if info["cuda_request"] == "AUTO":
        nvcc = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")
        assert info["built_with_cuda"] == nvcc
    if not info["built_with_cuda"]:
        assert "built without CUDA" in attrspace.backends()["cuda"]


def test_kernels_folder_is_installed_as_attrspace_kernels():
    import importlib.util

    spec = importlib.util.find_spec("attrspace.kernels")
    assert spec is not None and spec.origin.replace(os.sep, "/").endswith("kernels/__init__.py")
    assert importlib.util.find_spec("kernels") is None or "attrspace" not in (
        importlib.util.find_spec("kernels").origin or ""
    )
