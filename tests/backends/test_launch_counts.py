"""Device launches of one SubspaceLinear forward + backward, counted per backend on the CPU.

Counted: every torch op that launches a kernel (through a TorchDispatchMode; views, allocations and
no-op casts launch nothing), every Triton launch (the interpreter's launch entry, during which torch
ops are the interpreter's own and are not counted), and every entry into the CUDA backend's launcher
(one kernel each, no memset: csrc/subspace_linear.cu). Steps are counted warm (the second step), so
one-time allocations (the Triton and CUDA schedule buffers, the torch backend's [W | P] buffer) do not
count; autograd's `M.grad +=` does when a gradient is already there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attrspace import backends
from attrspace.adapters.functional import SubspaceLinearFn
from attrspace.testing import layer_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import roofline  # bench/roofline.py predicts from these launch lists

_ATEN = torch.ops.aten
NO_LAUNCH = {
    _ATEN.empty, _ATEN.empty_like, _ATEN.empty_strided, _ATEN.new_empty, _ATEN.new_empty_strided,
    _ATEN.view, _ATEN._unsafe_view, _ATEN.t, _ATEN.transpose, _ATEN.permute, _ATEN.expand,
    _ATEN.alias, _ATEN.as_strided, _ATEN.detach, _ATEN.slice, _ATEN.select, _ATEN.unsqueeze,
    _ATEN.squeeze, _ATEN._reshape_alias, _ATEN.lift_fresh, _ATEN.split, _ATEN.unbind,
}  # fmt: skip


class Launches(TorchDispatchMode):
    """Records the launching torch ops; `device(name)` records a launch made outside torch."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if not self.paused and packet not in NO_LAUNCH and func.namespace == "aten":
            self.names.append(packet.__name__)
        return out

    def device(self, name: str, count: int = 1) -> None:
        self.names += [name] * count


def _step(backend: str, dtype: torch.dtype, counter: Launches | None):
    T, d_in, d_out, K = 37, 100, 72, 24
    # contiguous bases, as SubspaceLinear.from_linear stores them
    t = {k: v.contiguous() for k, v in layer_inputs(T, d_in, d_out, K, dtype=dtype, seed=3).items()}
    x = t["x"].requires_grad_()
    M = t["M"].float().requires_grad_()
    dy = torch.randn(T, d_out, dtype=dtype)
    M.grad = torch.zeros_like(M)  # a gradient is already there: autograd accumulates into it
    phases = {}
    if counter is not None:
        counter.names.clear()  # what a warm-up step recorded outside the mode
    for phase in ("forward", "backward"):
        with counter if counter is not None else _null():
            if phase == "forward":
                y = SubspaceLinearFn.apply(
                    x, t["weight"], t["bias"], t["U"], t["V"], M, 1.5, backend
                )
            else:
                y.backward(dy)
        if counter is not None:
            phases[phase], counter.names = counter.names, []
    return phases


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def triton_launches(monkeypatch):
    if backends.unavailable_reason("triton") is not None:
        pytest.skip(backends.unavailable_reason("triton"))
    from triton.runtime import interpreter

    from attrspace.kernels import _config

    if not _config.INTERPRET:
        pytest.skip("Triton launches are counted under the interpreter (TRITON_INTERPRET=1)")
    counter = Launches()
    run = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        if not counter.paused:  # not the interpreter's calls of nested @triton.jit functions
            counter.device(f"triton:{self.fn.__name__}")
        counter.paused += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted)
    return counter


def test_triton_forward_is_one_launch_and_backward_two(triton_launches):
    _step("triton", torch.float32, None)  # warm: the schedule buffer is allocated once
    phases = _step("triton", torch.float32, triton_launches)
    # P is formed by the forward launch's first programs; Q, g, dx and dM all in the backward's
    assert phases["forward"] == ["triton:_fused_kernel"], phases
    # ... and autograd adds dM into the M.grad that was already there (no add when it is None)
    assert phases["backward"] == ["triton:_fused_kernel", "add_"], phases
    assert len(phases["forward"]) <= 2 and len(phases["backward"]) <= 3
    # the roofline prediction charges the same launches (M.grad += aside: set_to_none steps)
    assert len(roofline.triton(100, 72)) == len(phases["forward"]) + len(phases["backward"]) - 1


def test_cuda_backend_launches(monkeypatch):
    """The CUDA backend's whole-layer entries replaced by the reference (no GPU here); each entry is
    one device launch (the kernel: P, Q and dM are formed inside it, and its schedule is left at
    zero by its last block, so there is no memset)."""
    from attrspace.adapters import reference
    from attrspace.backends import cuda_backend

    counter = Launches()

    def forward_factored_into(x, weight, bias, U, V, M, scale, y, z):
        counter.device("cuda:kernel")
        counter.paused += 1  # the stand-in's own torch ops are not the backend's
        y0, z0 = reference.forward(x, weight, bias, V, scale * U.float() @ M)
        y.copy_(y0), z.copy_(z0)
        counter.paused -= 1

    def backward_factored_into(dy, weight, U, V, M, z, scale, dx, dm):
        counter.device("cuda:kernel")
        counter.paused += 1
        dx0, g0 = reference.backward(dy, weight, U, scale * V.float() @ M.t(), dx is not None)
        dm.copy_(reference.grad_m(g0, z.float(), scale))
        if dx is not None:
            dx.copy_(dx0)
        counter.paused -= 1

    monkeypatch.setattr(cuda_backend, "forward_factored_into", forward_factored_into)
    monkeypatch.setattr(cuda_backend, "backward_factored_into", backward_factored_into)
    _step("cuda", torch.bfloat16, None)
    phases = _step("cuda", torch.bfloat16, counter)
    # P = s U M is formed by the forward launch's first blocks
    assert phases["forward"] == ["cuda:kernel"], phases
    # Q, g, dx and dM = s g^T z in the backward's; then autograd adds dM into M.grad
    assert phases["backward"] == ["cuda:kernel", "add_"], phases
    assert len(phases["forward"]) <= 2 and len(phases["backward"]) <= 3
    # the roofline prediction charges the same launches (M.grad += aside: set_to_none steps)
    assert len(roofline.cuda(100, 72)) == len(phases["forward"]) + len(phases["backward"]) - 1


def test_torch_backend_fp32_launches():
    """fp32 folds s U M V^T into the weight: four ops forward, six backward (the fold recomputed, as
    the W-sized fold is not saved) and the accumulation into M.grad."""
    _step("torch", torch.float32, None)
    phases = _step("torch", torch.float32, Launches())
    assert phases["forward"] == ["mm", "addmm", "addmm", "mm"], phases
    assert phases["backward"] == ["mm", "mm", "addmm", "mm", "mm", "mul_", "add_"], phases


def test_torch_backend_copies_the_weight_once():
    """bf16 on the concatenated path: W goes into the persistent [W | P] buffer at the first step
    only; a warm step writes P and Q^T into it and makes no W-sized copy."""
    from attrspace.backends import torch_backend

    T, d_in, d_out, K = 37, 100, 72, 24
    t = {k: v.to(torch.bfloat16) for k, v in layer_inputs(T, d_in, d_out, K, seed=4).items()}
    P, Q = t["U"].float() @ t["M"].float(), t["V"].float() @ t["M"].float().t()
    dy = torch.randn(T, d_out).to(torch.bfloat16)
    sizes = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (_ATEN.copy_, _ATEN.cat, _ATEN.clone, _ATEN._to_copy):
                sizes.append((func.overloadpacket.__name__, out.numel()))
            return out

    step = lambda: (  # noqa: E731
        torch_backend.forward_concat(t["x"], t["weight"], t["bias"], t["V"], P),
        torch_backend.backward_concat(dy, t["weight"], t["U"], Q, True),
    )
    with Copies():
        step()
    assert ("copy_", d_out * d_in) in sizes  # the first step fills the buffer
    sizes.clear()
    with Copies():
        step()
    assert all(n < d_out * d_in for _, n in sizes), sizes  # no W-sized copy on a warm step
    assert ("copy_", d_out * K) in sizes and ("copy_", K * d_in) in sizes  # P and Q^T written
