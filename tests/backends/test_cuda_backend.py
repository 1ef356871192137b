"""The CUDA backend (csrc/subspace_linear*.cu*, attrspace.backends.cuda_backend) against attrspace.adapters.reference.

On a machine without a GPU the kernels still run: tests/backends/cuda_emulation compiles the same kernel
headers with the host compiler, replacing the few PTX instructions (ldmatrix, mma.sync, cp.async) by
emulations written from the PTX fragment layouts, and runs each block as 256 threads. That checks the
index math, ragged-tail masks, fragment layouts and the tile schedule of every dtype; the GPU tests at
the end check the real instructions and skip without a CUDA device. Outputs are poisoned (NaN) before
each run, so an element a kernel does not write fails the comparison.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from attrspace import backends
from attrspace.adapters import reference
from attrspace.backends import cuda_backend as _cuda_backend
from attrspace.backends import cupy_jit as _cupy_jit
from attrspace.backends import native as _native
from attrspace.testing import assert_close, layer_inputs

CUDA = torch.cuda.is_available()
NEEDS_GPU = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
EMULATION = Path(__file__).parent / "cuda_emulation"
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def _layer(T: int, d_in: int, d_out: int, K: int, dtype: torch.dtype, device: str, seed: int = 0):
    """x, weight, bias, U, V in dtype and P = s U M, Q = s V M^T in fp32 (scale s = 0.5)."""
    t = layer_inputs(T, d_in, d_out, K, dtype=dtype, device=device, seed=seed)
    U, V = t["U"].contiguous(), t["V"].contiguous()  # QR factors come column-major
    P = 0.5 * (U.float() @ t["M"])
    Q = 0.5 * (V.float() @ t["M"].t())
    return t["x"], t["weight"], t["bias"], U, V, P, Q


def _nan(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _check_forward(x, weight, bias, V, P, run) -> None:
    """Run forward_into through `run` on poisoned outputs and compare with the float64 reference."""
    T, d_out, K = x.shape[0], weight.shape[0], V.shape[1]
    y, z = (
        _nan(T, d_out, dtype=x.dtype, device=x.device),
        _nan(T, K, dtype=x.dtype, device=x.device),
    )
    run(x, weight, bias, V, P, y, z)
    f64 = [t.double() if t is not None else None for t in (x, weight, bias, V, P)]
    y64, z64 = reference.forward(*f64)
    y_torch, z_torch = reference.forward(x, weight, bias, V, P)
    assert_close(y, y64, x.dtype, "y", baseline=y_torch)
    assert_close(z, z64, x.dtype, "z", baseline=z_torch)


def _check_backward(dy, weight, U, Q, need_dx: bool, run) -> None:
    T, d_in, K = dy.shape[0], weight.shape[1], U.shape[1]
    dx = _nan(T, d_in, dtype=dy.dtype, device=dy.device) if need_dx else None
    g = _nan(T, K, dtype=torch.float32, device=dy.device)
    run(dy, weight, U, Q, dx, g)
    dx64, g64 = reference.backward(dy.double(), weight.double(), U.double(), Q.double(), True)
    dx_torch, g_torch = reference.backward(dy, weight, U, Q, True)
    assert_close(g, g64, torch.float32, "g", baseline=g_torch)
    if need_dx:
        assert_close(dx, dx64, dy.dtype, "dx", baseline=dx_torch)


# ---- Availability, reasons and build facts (any machine) -----------------------------------------


def test_reports_why_it_is_unavailable():
    reason = _cuda_backend.unavailable_reason()
    built_with_cuda = _native.cuda_unavailable_reason() is None
    if not built_with_cuda and _cupy_jit.unavailable_reason() is not None:
        assert reason is not None and "built without CUDA" in reason and "cupy" in reason
        assert backends.status()["cuda"] == reason
    elif not CUDA:
        assert reason == "no CUDA device is visible to torch"
    else:
        assert reason is None


def test_reason_names_each_missing_part(monkeypatch):
    monkeypatch.setattr(
        _native, "cuda_unavailable_reason", lambda: "attrspace._C was built without CUDA"
    )
    monkeypatch.setattr(_cupy_jit, "unavailable_reason", lambda: "cupy is not installed")
    _cuda_backend.launcher_name.cache_clear()
    try:
        reason = _cuda_backend.unavailable_reason()
        assert "built without CUDA" in reason and "cupy is not installed" in reason
        monkeypatch.setattr(_cupy_jit, "unavailable_reason", lambda: None)
        _cuda_backend.launcher_name.cache_clear()
        assert _cuda_backend.launcher_name() == "cupy"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert _cuda_backend.unavailable_reason() == "no CUDA device is visible to torch"
    finally:
        _cuda_backend.launcher_name.cache_clear()


def test_build_info_says_whether_nvcc_was_used():
    info = _native.native().build_info()
    if info["cuda_request"] == "OFF":
        assert not info["built_with_cuda"] and info["cuda_compiler"] == ""
        assert "ATTRSPACE_CUDA=OFF" in _native.cuda_unavailable_reason()
    else:  # AUTO or ON: the CUDA part is built exactly when the configure step found a compiler
        assert info["built_with_cuda"] == (info["cuda_compiler"] != "")
    if info["built_with_cuda"]:
        assert info["cuda_archs"]


def test_native_entry_points_check_their_arguments():
    C = _native.native()
    with pytest.raises(ValueError, match="K <= 128"):
        C.subspace_forward(0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 8, 8, 129, 0, 0)
    with pytest.raises(ValueError, match="dtype code"):
        C.subspace_backward(0, 0, 0, 0, 0, 0, 0, 4, 8, 8, 4, 7, 0)
    if C.build_info()["built_with_cuda"]:
        assert C.subspace_forward(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 8, 4, 0, 0) is None  # T = 0
        with pytest.raises(ValueError, match="must not be null"):
            C.subspace_forward(0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 8, 8, 4, 0, 0)
        # the whole-layer operands: checked before anything is launched (the addresses are dummies)
        fwd = (16,) * 9 + (4, 8, 8, 4, 0, 0)
        with pytest.raises(ValueError, match="m must not be null"):
            C.subspace_forward(*fwd, u=16, scale=0.5)
        bwd = (16,) * 7 + (4, 8, 8, 4, 0, 0)
        with pytest.raises(ValueError, match="z must not be null"):
            C.subspace_backward(*bwd, v=16, m=16, dm=16, part=16, scale=0.5)
        with pytest.raises(ValueError, match="part must not be null"):
            C.subspace_backward(*bwd, v=16, m=16, z=16, dm=16)
    else:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            C.subspace_forward(0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 8, 8, 4, 0, 0)
    for tokens in (0, 1, 63, 64, 65, 10952):
        for n in (1, 64, 65, 3072):
            assert C.schedule_ints(tokens, n) == _cuda_backend.schedule_ints(tokens, n)
        assert C.grad_part_floats(tokens, 72) == _cuda_backend.grad_part_floats(tokens, 72)


def test_unsupported_inputs_are_named():
    x = torch.zeros(4, 8, dtype=torch.float64)
    weight = torch.zeros(8, 6, dtype=torch.float32).t()  # (6, 8), not contiguous
    reasons = "; ".join(_cuda_backend.unsupported_reasons(x, weight, 129))
    for fragment in ("on cpu", "dtype torch.float64", "differs", "K=129", "not contiguous"):
        assert fragment in reasons
    with pytest.raises(ValueError, match="backend 'cuda' cannot run"):
        backends.select("cuda", x.float(), weight.contiguous(), 4)


def test_fake_ops_give_shapes_and_dtypes():
    meta = {"device": "meta", "dtype": torch.bfloat16}
    x, weight, V = (
        torch.empty(37, 100, **meta),
        torch.empty(72, 100, **meta),
        torch.empty(100, 24, **meta),
    )
    P = torch.empty(72, 24, device="meta")
    y, z = torch.ops.attrspace.cuda_subspace_forward(x, weight, None, V, P)
    assert (y.shape, y.dtype, z.shape, z.dtype) == (
        (37, 72),
        torch.bfloat16,
        (37, 24),
        torch.bfloat16,
    )
    dy, U, Q = (
        torch.empty(37, 72, **meta),
        torch.empty(72, 24, **meta),
        torch.empty(100, 24, device="meta"),
    )
    dx, g = torch.ops.attrspace.cuda_subspace_backward(dy, weight, U, Q, True)
    assert (dx.shape, dx.dtype, g.shape, g.dtype) == (
        (37, 100),
        torch.bfloat16,
        (37, 24),
        torch.float32,
    )
    dx, _ = torch.ops.attrspace.cuda_subspace_backward(dy, weight, U, Q, False)
    assert dx.shape == (0, 100)


def test_factored_fake_ops_give_shapes_and_dtypes():
    meta = {"device": "meta", "dtype": torch.float16}
    x, weight, U, V = (torch.empty(*s, **meta) for s in ((37, 100), (72, 100), (72, 24), (100, 24)))
    M = torch.empty(24, 24, device="meta")
    y, z = torch.ops.attrspace.cuda_subspace_forward_factored(x, weight, None, U, V, M, 0.5)
    assert (y.shape, y.dtype, z.shape, z.dtype) == (
        (37, 72),
        torch.float16,
        (37, 24),
        torch.float16,
    )
    dy = torch.empty(37, 72, **meta)
    for need_dx, rows in ((True, 37), (False, 0)):
        dx, dm = torch.ops.attrspace.cuda_subspace_backward_factored(
            dy, weight, U, V, M, z, 0.5, need_dx
        )
        assert (dx.shape, dm.shape, dm.dtype) == ((rows, 100), (24, 24), torch.float32)


def test_jit_sources_are_device_only_and_complete():
    source = _cupy_jit.kernel_source()
    includes = {line.split()[1] for line in source.splitlines() if line.startswith("#include")}
    assert includes == {"<cuda_bf16.h>", "<cuda_fp16.h>"}  # NVRTC has no host headers
    for kind in ("forward", "backward"):
        for suffix in ("f32", "f16", "bf16"):
            assert f"attrspace_{kind}_{suffix}(ATTRSPACE_KERNEL_PARAMS)" in source
    c = _cupy_jit.tile_constants()
    assert c["kThreads"] == 256 and c["kTcBlockM"] >= 64 and c["kSimtBlockM"] >= 64
    # 37 tokens, d_out 200, K 24: one row block of each family; 2 fp16 / 4 fp32 output tiles.
    assert _cupy_jit.grid_size(torch.float16, 37, 200, 24, True) == 1 + 2
    assert _cupy_jit.grid_size(torch.float32, 37, 200, 24, True) == 1 + 4
    assert _cupy_jit.grid_size(torch.float32, 130, 200, 72, False) == 3 * 2
    # factor tiles (one per output column tile) come first; none without output tiles
    assert _cupy_jit.grid_size(torch.float32, 37, 200, 24, True, True) == 4 + 1 + 4
    assert _cupy_jit.grid_size(torch.float16, 37, 200, 24, False, True) == 1


def test_forward_into_rejects_bad_buffers():
    x, weight, bias, U, V, P, Q = _layer(5, 16, 8, 4, torch.float32, "cpu")
    y, z = torch.empty(5, 8), torch.empty(5, 4)
    with pytest.raises(TypeError, match=r"P must be torch\.float32"):
        _cuda_backend.forward_into(x, weight, bias, V, P.half(), y, z)
    with pytest.raises(ValueError, match=r"y must have shape \(5, 8\)"):
        _cuda_backend.forward_into(x, weight, bias, V, P, torch.empty(5, 9), z)
    with pytest.raises(ValueError, match="V must be contiguous"):
        _cuda_backend.forward_into(x, weight, bias, torch.empty(4, 16).t(), P, y, z)
    with pytest.raises(ValueError, match=r"g must have shape \(5, 4\)"):
        _cuda_backend.backward_into(torch.empty(5, 8), weight, U, Q, None, torch.empty(5, 3))


# ---- The kernels, emulated on the CPU -------------------------------------------------------------


def _emulator_source() -> str:
    parts = [(EMULATION / "emulated_cuda.h").read_text()]
    kernel_dir = _cupy_jit.source_dir()
    for name in _cupy_jit.HEADERS:
        if name != "subspace_linear_ptx.cuh":  # replaced by emulated_cuda.h
            parts.append(_cupy_jit._LOCAL_INCLUDE.sub("", (kernel_dir / name).read_text()))
    parts.append((EMULATION / "runner.h").read_text())
    return "\n".join(parts)


@pytest.fixture(scope="session")
def emulator(request, tmp_path_factory):
    """The kernels compiled for the CPU (cached by source hash), loaded with ctypes."""
    compiler = shutil.which("g++")
    includes = _cupy_jit.cuda_include_dirs()
    if compiler is None or not includes:
        pytest.skip("the CPU emulation needs g++ and the CUDA headers (cuda_bf16.h)")
    source = _emulator_source()
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    folder = Path(
        cache.mkdir("cuda_emulation") if cache else tmp_path_factory.mktemp("cuda_emulation")
    )
    library = folder / f"kernels_{hashlib.sha256(source.encode()).hexdigest()[:16]}.so"
    if not library.exists():
        (folder / "kernels.cpp").write_text(source)
        command = [
            compiler,
            "-std=c++20",
            "-O1",
            "-w",
            "-shared",
            "-fPIC",
            "-pthread",
            f"-I{includes[0]}",
        ]
        subprocess.run([*command, str(folder / "kernels.cpp"), "-o", str(library)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.emu_launch.argtypes = [
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_ulonglong),
        ctypes.POINTER(ctypes.c_longlong),
        ctypes.c_float,
    ]
    return lib


@pytest.fixture
def emulated(emulator, monkeypatch):
    """_cuda_backend with its launcher replaced by the emulation; yields the launches made, each
    with a copy of the schedule as the launch left it (which must be all zero: no memset before the
    next launch)."""
    launches = []

    def launch(kind, dtype, pointers, sizes, scale, schedule):
        assert pointers[8] == schedule.data_ptr() and not schedule.any()
        blocks = _cupy_jit.grid_size(
            dtype, *sizes[:2], sizes[3], pointers[5] != 0, pointers[9] != 0
        )
        name = f"attrspace_{kind}_{_cuda_backend._KERNEL_SUFFIX[dtype]}"
        status = emulator.emu_launch(
            name.encode(),
            blocks,
            (ctypes.c_ulonglong * 14)(*pointers),
            (ctypes.c_longlong * 4)(*sizes),
            ctypes.c_float(scale),
        )
        assert status == 0
        launches.append((kind, blocks, schedule.clone()))

    monkeypatch.setattr(_cuda_backend, "_launch", launch)
    return launches


EMULATED_CASES = [  # (T, d_in, d_out, K, dtype, with bias, need dx)
    pytest.param(37, 100, 72, 24, torch.float32, True, True, id="ragged-fp32"),
    pytest.param(37, 100, 72, 24, torch.float16, True, True, id="ragged-fp16"),
    pytest.param(37, 100, 72, 24, torch.bfloat16, True, True, id="ragged-bf16"),
    # 2 row blocks, 2 output tiles, rows of V and U (K = 5) too short for 16-byte copies
    pytest.param(130, 72, 136, 5, torch.bfloat16, False, True, id="blocks-bf16"),
    # 2 row blocks, 3 output tiles and 2 projection tiles (K = 72 > 64) in the fp32 tiles
    pytest.param(70, 80, 136, 72, torch.float32, True, True, id="blocks-fp32"),
    pytest.param(1, 64, 64, 8, torch.bfloat16, False, False, id="one-token-no-dx"),
]


@pytest.mark.parametrize(
    ("T", "d_in", "d_out", "K", "dtype", "with_bias", "need_dx"), EMULATED_CASES
)
def test_emulated_kernels_match_reference(emulated, T, d_in, d_out, K, dtype, with_bias, need_dx):
    x, weight, bias, U, V, P, Q = _layer(T, d_in, d_out, K, dtype, "cpu")
    _check_forward(x, weight, bias if with_bias else None, V, P, _cuda_backend.forward_into)
    dy = torch.randn(T, d_out, generator=torch.Generator().manual_seed(1)).to(dtype)
    _check_backward(dy, weight, U, Q, need_dx, _cuda_backend.backward_into)
    # Each launch left its schedule at zero, ready for the next launch without a memset.
    assert len(emulated) == 2
    for _, _, schedule in emulated:
        assert not schedule.any()


def _check_factored(T, d_in, d_out, K, dtype, with_bias, need_dx, seed, device="cpu") -> None:
    """The whole-layer pair (P, Q and dM formed inside the launches) on poisoned outputs against
    the float64 reference: y and z, then dx (when asked for) and dM = s g^T z."""
    t = layer_inputs(T, d_in, d_out, K, dtype=dtype, device=device, seed=seed)
    x, weight, U, V = t["x"], t["weight"], t["U"].contiguous(), t["V"].contiguous()
    bias, M, s = t["bias"] if with_bias else None, t["M"].float(), 0.25 + seed
    y, z = _nan(T, d_out, dtype=dtype, device=device), _nan(T, K, dtype=dtype, device=device)
    _cuda_backend.forward_factored_into(x, weight, bias, U, V, M, s, y, z)
    f64 = [a.double() if a is not None else None for a in (x, weight, bias, U, V, M)]
    x64, w64, b64, U64, V64, M64 = f64
    y64, z64 = reference.forward(x64, w64, b64, V64, s * U64 @ M64)
    y_torch, z_torch = reference.forward(x, weight, bias, V, s * U.float() @ M)
    assert_close(y, y64, dtype, "y", baseline=y_torch)
    assert_close(z, z64, dtype, "z", baseline=z_torch)

    dy = torch.randn(T, d_out, generator=torch.Generator().manual_seed(seed + 7))
    dy = dy.to(device=device, dtype=dtype)
    dx = _nan(T, d_in, dtype=dtype, device=device) if need_dx else None
    dm = _nan(K, K, dtype=torch.float32, device=device)
    _cuda_backend.backward_factored_into(dy, weight, U, V, M, z, s, dx, dm)
    dx64, g64 = reference.backward(dy.double(), w64, U64, s * V64 @ M64.t(), True)
    dx_torch, g_torch = reference.backward(dy, weight, U, s * V.float() @ M.t(), True)
    assert_close(dm, reference.grad_m(g64, z.double(), s), torch.float32, "dM",
                 baseline=reference.grad_m(g_torch, z.float(), s))  # fmt: skip
    if need_dx:
        assert_close(dx, dx64, dtype, "dx", baseline=dx_torch)


FACTORED_CASES = [  # (T, d_in, d_out, K, dtype, with bias, need dx)
    pytest.param(37, 100, 72, 24, torch.float32, True, True, id="ragged-fp32"),
    pytest.param(45, 40, 88, 12, torch.float16, True, False, id="ragged-fp16-no-dx"),
    pytest.param(29, 56, 24, 16, torch.bfloat16, False, True, id="ragged-bf16"),
    # 2 row blocks and 2 factor / output column tiles of 128; rows of U and V (K = 5) too short for
    # 16-byte copies
    pytest.param(130, 136, 200, 5, torch.bfloat16, True, True, id="blocks-bf16"),
    pytest.param(131, 72, 136, 9, torch.float16, False, True, id="blocks-fp16"),
    # K = 72 > 64: each row block's g (and its dM part) in 2 column tiles; 2 and 3 row blocks
    pytest.param(70, 80, 136, 72, torch.float32, True, True, id="wide-rank-fp32"),
    pytest.param(150, 96, 80, 72, torch.float32, False, False, id="wide-rank-fp32-no-dx"),
]


@pytest.mark.parametrize(
    ("T", "d_in", "d_out", "K", "dtype", "with_bias", "need_dx"), FACTORED_CASES
)
def test_emulated_factored_passes_match_reference(
    emulated, monkeypatch, T, d_in, d_out, K, dtype, with_bias, need_dx
):
    # scratch poisoned too: P / Q (factor tiles), g, z before rounding, the dM parts
    monkeypatch.setattr(
        _cuda_backend,
        "_scratch",
        lambda *shape, device: _nan(*shape, dtype=torch.float32, device=device),
    )
    for seed in (0, 1):  # the second pair reuses the schedule the first left behind
        _check_factored(T, d_in, d_out, K, dtype, with_bias, need_dx, seed)
    assert [kind for kind, _, _ in emulated] == ["forward", "backward"] * 2
    for _, _, schedule in emulated:
        assert not schedule.any()  # reset by each launch's last block: no memset before the next


def test_emulated_factored_entry_points_and_ops(emulated):
    """forward_factored / backward_factored (eager: the launcher; the custom ops: opcheck) give
    the factored results, and SubspaceLinearFn uses them: one launch per pass."""
    from attrspace.adapters.functional import SubspaceLinearFn

    t = layer_inputs(21, 40, 24, 8, dtype=torch.float16, seed=5)
    args = (t["x"], t["weight"], t["bias"], t["U"], t["V"], t["M"].float(), 0.5)
    y, z = _cuda_backend.forward_factored(*args)
    assert_close(y, reference.forward(*(a.double() for a in args[:3]), args[4].double(),
                                      0.5 * args[3].double() @ args[5].double())[0],
                 torch.float16, "y")  # fmt: skip
    dy = torch.randn(21, 24).half()
    dx, dm = _cuda_backend.backward_factored(
        dy, t["weight"], t["U"], t["V"], args[5], z, 0.5, False
    )
    assert dx is None and dm.shape == (8, 8) and dm.dtype == torch.float32
    torch.library.opcheck(torch.ops.attrspace.cuda_subspace_forward_factored, args)
    for need_dx in (True, False):
        torch.library.opcheck(
            torch.ops.attrspace.cuda_subspace_backward_factored,
            (dy, t["weight"], t["U"], t["V"], args[5], z, 0.5, need_dx),
        )
    emulated.clear()
    x = t["x"].clone().requires_grad_()
    M = args[5].clone().requires_grad_()
    SubspaceLinearFn.apply(x, t["weight"], t["bias"], t["U"], t["V"], M, 0.5, "cuda").backward(dy)
    assert [kind for kind, _, _ in emulated] == ["forward", "backward"]
    assert_close(M.grad, dm.double(), torch.float32, "dM")  # the same launch as above, with dx


def test_emulated_layer_compiles_fullgraph(emulated):
    """Under torch.compile(fullgraph=True) SubspaceLinearFn reaches the whole-layer custom ops (no
    graph break at the launch) and gives the eager results: one launch per pass either way."""
    from attrspace.adapters.functional import SubspaceLinearFn

    t = layer_inputs(13, 24, 16, 4, dtype=torch.float16, seed=6)
    dy = torch.randn(13, 16).half()

    def layer(x, M):
        return SubspaceLinearFn.apply(x, t["weight"], t["bias"], t["U"], t["V"], M, 0.5, "cuda")

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (layer, compiled):
        emulated.clear()
        x, M = t["x"].clone().requires_grad_(), t["M"].float().requires_grad_()
        y = fn(x, M)
        y.backward(dy)
        results.append((y.detach(), x.grad, M.grad))
        assert [kind for kind, _, _ in emulated] == ["forward", "backward"]
    for eager, traced in zip(*results, strict=True):
        assert torch.equal(eager, traced)


def test_emulated_custom_ops_pass_opcheck(emulated):
    x, weight, bias, U, V, P, Q = _layer(9, 24, 16, 8, torch.float16, "cpu")
    torch.library.opcheck(torch.ops.attrspace.cuda_subspace_forward, (x, weight, bias, V, P))
    dy = torch.randn(9, 16).half()
    for need_dx in (True, False):
        torch.library.opcheck(
            torch.ops.attrspace.cuda_subspace_backward, (dy, weight, U, Q, need_dx)
        )


def test_zero_tokens_launch_nothing(emulated):
    x, weight, bias, U, V, P, Q = _layer(0, 16, 8, 4, torch.bfloat16, "cpu")
    y, z = _cuda_backend.forward(x, weight, bias, V, P)
    dx, g = _cuda_backend.backward(torch.empty(0, 8, dtype=torch.bfloat16), weight, U, Q, True)
    assert y.shape == (0, 8) and z.shape == (0, 4) and dx.shape == (0, 16) and g.shape == (0, 4)
    assert emulated == []


# ---- The kernels on a GPU --------------------------------------------------------------------------

GPU_SHAPES = [  # (T, d_in, d_out, K)
    pytest.param(37, 100, 72, 24, id="ragged"),
    pytest.param(1, 64, 64, 8, id="one-token"),
    pytest.param(300, 256, 264, 128, id="max-rank"),
    pytest.param(130, 136, 200, 5, id="short-rows"),
    pytest.param(2048, 1024, 3072, 64, id="qkv-like"),
]


@NEEDS_GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "d_in", "d_out", "K"), GPU_SHAPES)
def test_gpu_kernels_match_reference(T, d_in, d_out, K, dtype):
    if _cuda_backend.unavailable_reason() is not None:
        pytest.skip(_cuda_backend.unavailable_reason())
    x, weight, bias, U, V, P, Q = _layer(T, d_in, d_out, K, dtype, "cuda")
    for b in (bias, None):
        _check_forward(x, weight, b, V, P, _cuda_backend.forward_into)
    dy = torch.randn(T, d_out, device="cuda").to(dtype)
    for need_dx in (True, False):
        _check_backward(dy, weight, U, Q, need_dx, _cuda_backend.backward_into)


@NEEDS_GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "d_in", "d_out", "K"), GPU_SHAPES)
def test_gpu_factored_passes_match_reference(T, d_in, d_out, K, dtype):
    if _cuda_backend.unavailable_reason() is not None:
        pytest.skip(_cuda_backend.unavailable_reason())
    for need_dx, seed in ((True, 0), (False, 1)):
        _check_factored(T, d_in, d_out, K, dtype, need_dx, need_dx, seed, device="cuda")


@NEEDS_GPU
@pytest.mark.gpu
def test_gpu_factored_backward_is_deterministic():
    """dM is summed in row-block order whichever block finishes last, and the schedule each launch
    leaves behind serves the next: repeated launches give identical bits."""
    if _cuda_backend.unavailable_reason() is not None:
        pytest.skip(_cuda_backend.unavailable_reason())
    t = layer_inputs(2048, 256, 264, 64, dtype=torch.bfloat16, device="cuda", seed=2)
    U, V, M = t["U"].contiguous(), t["V"].contiguous(), t["M"].float()
    _, z = _cuda_backend.forward_factored(t["x"], t["weight"], t["bias"], U, V, M, 0.5)
    dy = torch.randn(2048, 264, device="cuda").bfloat16()
    runs = [
        _cuda_backend.backward_factored(dy, t["weight"], U, V, M, z, 0.5, True) for _ in range(3)
    ]
    for dx, dm in runs[1:]:
        assert torch.equal(dx, runs[0][0]) and torch.equal(dm, runs[0][1])


@NEEDS_GPU
@pytest.mark.gpu
def test_gpu_side_stream_and_opcheck():
    if _cuda_backend.unavailable_reason() is not None:
        pytest.skip(_cuda_backend.unavailable_reason())
    x, weight, bias, U, V, P, Q = _layer(37, 100, 72, 24, torch.bfloat16, "cuda")
    expected_y, _ = _cuda_backend.forward(x, weight, bias, V, P)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y, _ = _cuda_backend.forward(x, weight, bias, V, P)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(y, expected_y)  # same kernel, same order of sums: identical bits
    torch.library.opcheck(torch.ops.attrspace.cuda_subspace_forward, (x, weight, bias, V, P))
    dy = torch.randn(37, 72, device="cuda").bfloat16()
    for need_dx in (True, False):
        torch.library.opcheck(
            torch.ops.attrspace.cuda_subspace_backward, (dy, weight, U, Q, need_dx)
        )


@NEEDS_GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_layer_gradients_match_torch_backend(dtype):
    if _cuda_backend.unavailable_reason() is not None:
        pytest.skip(_cuda_backend.unavailable_reason())
    from attrspace.adapters.functional import subspace_linear

    t = layer_inputs(2, 96, 80, 16, dtype=dtype, device="cuda", seed=3)
    results = {}
    for backend in ("cuda", "torch"):
        x = t["x"].reshape(2, 1, 96).clone().requires_grad_(True)
        M = t["M"].clone().requires_grad_(True)
        y, name = subspace_linear(
            x, t["weight"], t["bias"], t["U"], t["V"], M, 0.5, backend=backend
        )
        assert name == backend
        y.float().square().sum().backward()
        results[backend] = (y.detach(), x.grad, M.grad)
    for got, want, what in zip(results["cuda"], results["torch"], ("y", "dx", "dM"), strict=True):
        assert_close(got, want.double(), dtype if what != "dM" else torch.float32, what)
