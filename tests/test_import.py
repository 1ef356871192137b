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


# Run in a fresh interpreter: which `kernels` is found depends on sys.path, not on this process.
KERNELS_CHECK = """
import importlib.util, pathlib, sys
ours = importlib.util.find_spec("attrspace.kernels")
assert ours is not None and ours.origin.replace("\\\\", "/").endswith("kernels/__init__.py"), ours
assert importlib.util.find_spec("attrspace.kernels.subspace_linear") is not None
top = importlib.util.find_spec("kernels")
if top is not None and top.origin is not None:
    # Another distribution's `kernels` (peft's dependencies bring one) is fine wherever it lives,
    # whatever its path says. attrspace's kernels (told by their files, not by a path) under a
    # top-level name are fine only from a source checkout on sys.path (its root holds
    # pyproject.toml and attrspace/), never from an installed wheel.
    folder = pathlib.Path(top.origin).resolve().parent
    ours_too = (folder / "subspace_linear.py").is_file() and (folder / "rsvd.py").is_file()
    checkout = (folder.parent / "pyproject.toml").is_file() and (folder.parent / "attrspace").is_dir()
    assert not ours_too or checkout, f"attrspace's kernels installed as top-level: {top.origin}"
print("ok")
"""


def _kernels_check(extra_path: list[str]) -> subprocess.CompletedProcess:
    path = os.pathsep.join([*extra_path, *sys.path[1:]])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-P", "-c", KERNELS_CHECK], capture_output=True, text=True, env=env
    )


def test_kernels_folder_is_installed_as_attrspace_kernels():
    out = _kernels_check([])
    assert out.stdout.strip() == "ok", out.stderr


def test_the_kernels_check_holds_beside_another_kernels_package(tmp_path):
    # A virtual environment whose path contains "attrspace" and that holds an unrelated `kernels`
    # package: the check used to fail there on the word "attrspace" in the other package's path.
    site = tmp_path / "attrspace-venv" / "site-packages"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = None\n")
    out = _kernels_check([str(site)])
    assert out.stdout.strip() == "ok", out.stderr
    # and it still catches attrspace's own kernels installed as a top-level package
    wheel = tmp_path / "attrspace-venv" / "bad-wheel"
    import attrspace.kernels

    shutil.copytree(os.path.dirname(attrspace.kernels.__file__), wheel / "kernels")
    (wheel / "attrspace").symlink_to(os.path.dirname(attrspace.__file__))
    out = _kernels_check([str(wheel)])
    assert out.returncode != 0 and "AssertionError" in out.stderr
