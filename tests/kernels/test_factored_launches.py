"""The one-launch entry points of the Triton kernels (P / Q formed by the launch's first programs, dM
reduced inside the backward, the schedule left at zero for the next launch) against float64 on
fresh random ragged shapes, under the interpreter (fp32, fp16) or on a GPU (bf16 too)."""

from __future__ import annotations

import pytest
import torch

from attrspace.adapters import reference
from attrspace.testing import assert_close, layer_inputs

kernels = pytest.importorskip("attrspace.kernels.subspace_linear")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def _random_shape(seed: int) -> tuple[int, int, int, int]:
    g = torch.Generator().manual_seed(seed)
    T, d_in, d_out = (int(v) for v in torch.randint(1, 90, (3,), generator=g))
    K = int(torch.randint(1, 40, (1,), generator=g))
    return T, d_in + 8, d_out + 8, min(K, d_in + 8, d_out + 8)  # orthonormal bases: K <= d


# dM's two forms (_grad_m_part): exact products over row chunks (sm_90, and fp32 everywhere) and one
# TF32 product over the whole tile (sm_80 in fp16 / bf16), whichever device runs the test
DM_CASES = [(d, p) for d in DTYPES for p in ("ieee", "tf32") if d != torch.float32 or p == "ieee"]


@pytest.mark.parametrize(("dtype", "dm_precision"), DM_CASES, ids=str)
@pytest.mark.parametrize("seed", [11, 12])
def test_factored_forward_and_backward_match_float64(monkeypatch, dtype, dm_precision, seed):
    monkeypatch.setattr(kernels, "_dm_precision", lambda a: dm_precision)
    T, d_in, d_out, K = _random_shape(seed + 100 * DTYPES.index(dtype))
    t = layer_inputs(T, d_in, d_out, K, dtype=dtype, device=DEVICE, seed=seed)
    M, s = t["M"].float(), 1.3
    nan = float("nan")
    y, z = kernels.subspace_linear_forward_factored(
        t["x"], t["weight"], t["bias"], t["U"], t["V"], M, s,
        out=torch.full((T, d_out), nan, dtype=dtype, device=DEVICE),
        z_out=torch.full((T, K), nan, dtype=dtype, device=DEVICE),
    )  # fmt: skip
    x64, w64, b64, U64, V64 = (t[n].double() for n in ("x", "weight", "bias", "U", "V"))
    P64, Q64 = s * U64 @ M.double(), s * V64 @ M.double().t()
    y64, z64 = reference.forward(x64, w64, b64, V64, P64)
    assert_close(z, z64, dtype, "z")
    assert_close(y, y64, dtype, "y")
    dy = torch.randn(T, d_out, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    for need_dx in (True, False):
        dx, g, dm = kernels.subspace_linear_backward_factored(
            dy, t["weight"], t["U"], t["V"], M, z, s, need_dx
        )
        dx64, g64 = reference.backward(dy.double(), w64, U64, Q64, True)
        assert_close(g, g64, torch.float32, "g")
        # dM from the kernel's own z (what the layer saves) and g in float64
        assert_close(
            dm, s * g64.t() @ z.double(), torch.float32 if dtype == torch.float32 else dtype, "dM"
        )
        assert (dx is None) != need_dx
        if need_dx:
            assert_close(dx, dx64, dtype, "dx")
    # every launch left its schedule at zero, so the next one needs no memset
    assert all(int(b.abs().sum()) == 0 for b in kernels._SCHEDULES.values())


def test_factored_entry_points_name_bad_arguments():
    t = layer_inputs(9, 16, 12, 4, device=DEVICE, seed=1)
    with pytest.raises(TypeError, match=r"M must be torch\.float32"):
        kernels.subspace_linear_forward_factored(
            t["x"], t["weight"], None, t["U"], t["V"], t["M"].double(), 1.0
        )
    with pytest.raises(ValueError, match="z must have shape"):
        kernels.subspace_linear_backward_factored(
            t["x"][:, :12], t["weight"], t["U"], t["V"], t["M"], t["x"][:3, :4], 1.0
        )
    with pytest.raises(ValueError, match="scale must be a finite number"):
        kernels.subspace_linear_forward_factored(
            t["x"], t["weight"], None, t["U"], t["V"], t["M"], float("nan")
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 64, 40, 16), (70, 48, 96, 8)], ids=["37x64x40", "70x48x96"])
def test_tensor_descriptor_path_matches_float64(monkeypatch, dtype, shape):
    """The TMA main loops (taken on sm_90 by default) forced on: the copy engine's zero fill stands in
    for the masks, so rows past T, the R tail and ragged column tiles must still come out right."""
    monkeypatch.setattr(kernels, "TMA_MODE", "on")
    made = []
    descriptors = kernels._descriptors
    monkeypatch.setattr(
        kernels, "_descriptors", lambda *a: made.append(descriptors(*a)) or made[-1]
    )
    T, d_in, d_out, K = shape
    t = layer_inputs(T, d_in, d_out, K, dtype=dtype, device=DEVICE, seed=sum(shape))
    M, s = t["M"].float(), 0.7
    y, z = kernels.subspace_linear_forward_factored(
        t["x"], t["weight"], t["bias"], t["U"], t["V"].contiguous(), M, s,
        out=torch.full((T, d_out), float("nan"), dtype=dtype, device=DEVICE),
    )  # fmt: skip
    dy = torch.randn(T, d_out, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    dx, g, dm = kernels.subspace_linear_backward_factored(
        dy, t["weight"], t["U"].contiguous(), t["V"], M, z, s
    )
    assert len(made) == 2 and all(d is not None for d in made)  # both passes on descriptors
    x64, w64, b64, U64, V64 = (t[n].double() for n in ("x", "weight", "bias", "U", "V"))
    y64, z64 = reference.forward(x64, w64, b64, V64, s * U64 @ M.double())
    dx64, g64 = reference.backward(dy.double(), w64, U64, s * V64 @ M.double().t(), True)
    assert_close(y, y64, dtype, "y")
    assert_close(z, z64, dtype, "z")
    assert_close(dx, dx64, dtype, "dx")
    assert_close(g, g64, torch.float32, "g")
    dm_dtype = torch.float32 if dtype == torch.float32 else dtype
    assert_close(dm, s * g64.t() @ z.double(), dm_dtype, "dM")
    assert_close(
        dm, s * g64.t() @ z.double(), torch.float32 if dtype == torch.float32 else dtype, "dM"
    )


def test_whole_layer_custom_ops_pass_opcheck():
    """The ops torch.compile traces for the one-launch passes: schemas, fake shapes, autograd
    registration and dispatch consistent."""
    from attrspace.backends import triton_backend

    t = layer_inputs(9, 20, 12, 4, seed=13, device=DEVICE)
    M = t["M"].float()
    args = (t["x"], t["weight"], t["bias"], t["U"], t["V"].contiguous(), M, 1.5)
    torch.library.opcheck(triton_backend._forward_factored_op, args)
    z = t["x"] @ t["V"]
    dy = torch.randn(9, 12, device=DEVICE)
    for need_dx in (True, False):
        torch.library.opcheck(
            triton_backend._backward_factored_op,
            (dy, t["weight"], t["U"], t["V"], M, z, 1.5, need_dx),
        )


@pytest.mark.skipif(CUDA, reason="programs and tickets are counted under the interpreter")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_persistent_grid_has_fewer_programs_than_tickets_and_stays_exact(monkeypatch, dtype):
    """The launch has min(SMs x PROGRAMS_PER_SM, tickets) programs, each taking tickets until they
    run out: on a pretend device of 2 SMs a problem of 15 (forward) and 11 (backward) tickets runs
    2 programs, every ticket is worked exactly once, the results match float64 and the schedule is
    left at zero. The g-only backward (no output columns) keeps one program per ticket."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    monkeypatch.setattr(kernels, "INTERPRETER_SMS", 2)
    grids, worked = [], []  # worked: (launch, program id, ticket) of every ticket's work
    set_grid_dim, call = builder.set_grid_dim, interpreter.InterpretedFunction.__call__

    def record_grid(*grid):
        grids.append(grid)
        return set_grid_dim(*grid)

    def record_ticket(self, *args, **kwargs):
        if self.fn.__name__ == "_run_ticket":
            worked.append((len(grids), builder.grid_idx[0], int(args[0].handle.data.item())))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(builder, "set_grid_dim", record_grid)
    monkeypatch.setattr(interpreter.InterpretedFunction, "__call__", record_ticket)
    T, d_in, d_out, K = 70, 48, 96, 8  # 32 x 32 blocks: 3 row blocks, 3 / 2 column tiles
    t = layer_inputs(T, d_in, d_out, K, dtype=dtype, device=DEVICE, seed=21)
    M, s = t["M"].float(), 0.9
    y, z = kernels.subspace_linear_forward_factored(
        t["x"], t["weight"], t["bias"], t["U"], t["V"], M, s,
        out=torch.full((T, d_out), float("nan"), dtype=dtype, device=DEVICE),
    )  # fmt: skip
    dy = torch.randn(T, d_out, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    dx, g, dm = kernels.subspace_linear_backward_factored(dy, t["weight"], t["U"], t["V"], M, z, s)
    _, g_only, _ = kernels.subspace_linear_backward_factored(
        dy, t["weight"], t["U"], t["V"], M, z, s, need_dx=False
    )
    assert grids == [(2, 1, 1), (2, 1, 1), (3, 1, 1)]
    # forward: 3 factor + 3 row blocks x (1 side + 3 output) tickets; backward: 2 + 3 x (1 + 2);
    # g-only: 3 side programs, one ticket each
    for launch, n_tickets in ((1, 15), (2, 11)):
        tickets = sorted(tk for n, _, tk in worked if n == launch)
        assert tickets == list(range(n_tickets)), (launch, tickets)
        programs = {p for n, p, _ in worked if n == launch}
        assert programs <= {0, 1} and len(tickets) > len(programs)  # programs loop
    assert sorted((p, tk) for n, p, tk in worked if n == 3) == [(0, 0), (1, 1), (2, 2)]
    x64, w64, b64, U64, V64 = (t[n].double() for n in ("x", "weight", "bias", "U", "V"))
    y64, z64 = reference.forward(x64, w64, b64, V64, s * U64 @ M.double())
    dx64, g64 = reference.backward(dy.double(), w64, U64, s * V64 @ M.double().t(), True)
    assert_close(y, y64, dtype, "y")
    assert_close(z, z64, dtype, "z")
    assert_close(dx, dx64, dtype, "dx")
    assert_close(g, g64, torch.float32, "g")
    assert_close(g_only, g64, torch.float32, "g (g-only)")
    dm_dtype = torch.float32 if dtype == torch.float32 else dtype
    assert_close(dm, s * g64.t() @ z.double(), dm_dtype, "dM")
    assert all(int(b.abs().sum()) == 0 for b in kernels._SCHEDULES.values())
