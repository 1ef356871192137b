"""The adapted layer's math: gradients, the dense formula, saved tensors, low precision, bad input."""

import pytest
import torch

import attrspace
from attrspace import backends
from attrspace.adapters.functional import subspace_linear
from attrspace.adapters.reference import dense_subspace_linear
from attrspace.measure.profiling import saved_tensor_records
from attrspace.testing import assert_close, layer_inputs

SHAPES = [(64, 48, 40, 8), (37, 100, 72, 24), (1, 16, 24, 5)]


def cpu_backends():
    """Backends that can run on CPU tensors here (triton only under TRITON_INTERPRET=1)."""
    x = torch.zeros(1, 4)
    return [n for n in backends.names() if not backends.reasons(n, x, torch.zeros(4, 4), 2)]


@pytest.mark.gradcheck
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    t = layer_inputs(6, 7, 5, 3, dtype=torch.float64, seed=1)
    x = t["x"].reshape(2, 3, 7).requires_grad_()
    M = t["M"].double().requires_grad_()
    b = t["bias"] if bias else None
    fn = lambda x, M: subspace_linear(x, t["weight"], b, t["U"], t["V"], M, 0.7, "torch")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, M))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_dense_formula_fp32(backend, shape):
    T, d_in, d_out, K = shape
    t = layer_inputs(T, d_in, d_out, K, seed=hash(shape) % 1000)
    t64 = {k: v.double() for k, v in t.items()}
    x = t["x"].requires_grad_()
    M = t["M"].clone().requires_grad_()
    y, used = subspace_linear(x, t["weight"], t["bias"], t["U"], t["V"], M, 2.0, backend)
    assert used == backend
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = t64["x"].requires_grad_()
    M64 = t64["M"].requires_grad_()
    y64 = dense_subspace_linear(x64, t64["weight"], t64["bias"], t64["U"], t64["V"], M64, 2.0)
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, "y")
    assert_close(x.grad, x64.grad, torch.float32, "dx")
    assert_close(M.grad, M64.grad, torch.float32, "dM")


def test_leading_batch_dims_and_no_input_grad():
    t = layer_inputs(24, 16, 12, 4, seed=3)
    x = t["x"].reshape(2, 3, 4, 16)
    M = t["M"].clone().requires_grad_()
    y, _ = subspace_linear(x, t["weight"], t["bias"], t["U"], t["V"], M, 1.0)
    assert y.shape == (2, 3, 4, 12)
    y.sum().backward()  # x needs no grad: only dM is formed
    M64 = t["M"].double().requires_grad_()
    dense_subspace_linear(
        x.double(),
        t["weight"].double(),
        t["bias"].double(),
        t["U"].double(),
        t["V"].double(),
        M64,
        1.0,
    ).sum().backward()
    assert_close(M.grad, M64.grad, torch.float32, "dM")


def test_saves_tokens_times_k_not_tokens_times_d_in():
    T, d_in, d_out, K = 512, 256, 384, 16
    t = layer_inputs(T, d_in, d_out, K)
    x = t["x"].requires_grad_()
    M = t["M"].requires_grad_()
    own = [t["weight"], t["bias"], t["U"], t["V"], M]
    records = saved_tensor_records(
        lambda: subspace_linear(x, t["weight"], t["bias"], t["U"], t["V"], M, 1.0, "torch")[0], own
    )
    saved = sum(nbytes for _, _, nbytes in records)
    assert [shape for shape, _, _ in records] == [(T, K)], records
    assert saved == T * K * 4
    # The LoRA baseline has to keep x itself: T * d_in elements.
    lora = attrspace.LoRALinear.from_linear(torch.nn.Linear(d_in, d_out), 16, 16)
    lora_own = [*lora.parameters(), *lora.buffers()]
    lora_saved = sum(n for _, _, n in saved_tensor_records(lambda: lora(x), lora_own))
    assert lora_saved >= T * d_in * 4
    assert saved * 8 <= lora_saved


def _fraction_recovered(dtype, ratio):
    """<y - y_base, delta> / <delta, delta> with an adapter term `ratio` of the base output."""
    T, d_in, d_out, K = 256, 128, 96, 16
    t = layer_inputs(T, d_in, d_out, K, dtype=torch.float64, seed=7)
    base = t["x"] @ t["weight"].t() + t["bias"]
    delta_unit = t["x"] @ t["V"] @ t["M"].double().t() @ t["U"].t()
    scale = ratio * float(base.norm() / delta_unit.norm())
    low = {k: (v.to(dtype) if k != "M" else v) for k, v in t.items()}
    y, _ = subspace_linear(
        low["x"], low["weight"], low["bias"], low["U"], low["V"], low["M"], scale, "torch"
    )
    # Against the base computed from the SAME rounded inputs, so only the adapter's path is judged.
    base_low_inputs = low["x"].double() @ low["weight"].double().t() + low["bias"].double()
    delta_low_inputs = scale * (
        low["x"].double() @ low["V"].double() @ low["M"].double().t() @ low["U"].double().t()
    )
    got = y.double() - base_low_inputs
    return float((got * delta_low_inputs).sum() / (delta_low_inputs * delta_low_inputs).sum())


# The ratio sits near each format's resolution: adding it to an output already rounded to bf16 keeps
# about half of a 1e-3 update (fp16, with 3 more mantissa bits, loses as much at 1e-4).
@pytest.mark.parametrize(("dtype", "ratio"), [(torch.bfloat16, 1e-3), (torch.float16, 1e-4)])
def test_small_update_survives_low_precision(dtype, ratio):
    fraction = _fraction_recovered(dtype, ratio)
    assert 0.9 <= fraction <= 1.1, fraction


def test_merging_into_bf16_loses_the_small_update():
    """The failure the fp32 epilogue avoids: the same update merged into bf16 weights is mostly lost."""
    t = layer_inputs(256, 128, 96, 16, dtype=torch.float64, seed=7)
    base_w = t["weight"].to(torch.bfloat16)
    delta_w = 1e-3 * t["weight"].abs().mean() * (t["U"] @ t["M"].double() @ t["V"].t())
    merged = (base_w.double() + delta_w).to(torch.bfloat16)
    kept = float(((merged.double() - base_w.double()) * delta_w).sum() / (delta_w * delta_w).sum())
    assert kept < 0.8, kept


def test_bad_inputs_are_named():
    t = layer_inputs(8, 16, 12, 4)
    args = [t["x"], t["weight"], t["bias"], t["U"], t["V"], t["M"]]
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 16\)"):
        subspace_linear(torch.zeros(8, 15), *args[1:])
    with pytest.raises(ValueError, match="U must have shape"):
        subspace_linear(t["x"], t["weight"], t["bias"], t["U"][:, :3], t["V"], t["M"])
    with pytest.raises(ValueError, match="V must have shape"):
        subspace_linear(t["x"], t["weight"], t["bias"], t["U"], t["V"][:10], t["M"])
    with pytest.raises(TypeError, match=r"weight is torch\.float64 but x is torch\.float32"):
        subspace_linear(t["x"], t["weight"].double(), t["bias"], t["U"], t["V"], t["M"])
    with pytest.raises(TypeError, match="x must be float"):
        subspace_linear(t["x"].to(torch.int32), *args[1:])
    with pytest.raises(ValueError, match="U is on meta"):
        subspace_linear(t["x"], t["weight"], t["bias"], t["U"].to("meta"), t["V"], t["M"])
    with pytest.raises(ValueError, match="frozen"):
        subspace_linear(
            t["x"], t["weight"].clone().requires_grad_(), t["bias"], t["U"], t["V"], t["M"]
        )
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        subspace_linear(*args, backend="fast")


def _corruptions(t: dict) -> list[tuple[str, dict]]:
    """One argument made wrong at a time: shape, dtype, device, trainable frozen tensors."""
    out = []
    for name in ("x", "weight", "bias", "U", "V", "M"):
        v = t[name]
        out += [
            (f"{name} shape", {name: v[..., :-1] if v.ndim else v}),
            (f"{name} device", {name: v.to("meta")}),
        ]
        if name != "M":  # M may be any float dtype
            out.append((f"{name} dtype", {name: v.double()}))
    out += [
        ("x int", {"x": t["x"].to(torch.int32)}),
        ("x 0-d", {"x": torch.tensor(1.0)}),
        ("M 1-d", {"M": t["M"][0]}),
        ("trainable weight", {"weight": t["weight"].clone().requires_grad_()}),
        ("trainable bias", {"bias": t["bias"].clone().requires_grad_()}),
    ]
    return out


def test_fast_check_accepts_only_what_the_full_check_accepts():
    """_check answers a well-formed call from one expression (_well_formed) and explains a bad one
    from the detailed checks; every single corruption must fail the expression and raise."""
    from attrspace.adapters.functional import _check, _well_formed

    t = layer_inputs(8, 16, 12, 4)
    order = ("x", "weight", "bias", "U", "V", "M")
    assert _well_formed(*(t[k] for k in order))
    assert _well_formed(*(t[k] if k != "bias" else None for k in order))
    for what, change in _corruptions(t):
        args = [change.get(k, t[k]) for k in order]
        assert not _well_formed(*args), what
        with pytest.raises((ValueError, TypeError)):
            _check(*args)


def test_explicit_unavailable_backend_is_an_error_not_a_fallback():
    t = layer_inputs(8, 16, 12, 4)
    for name, status in attrspace.backends().items():
        if status != "available":
            with pytest.raises(ValueError, match=f"backend '{name}' cannot run"):
                subspace_linear(
                    t["x"], t["weight"], t["bias"], t["U"], t["V"], t["M"], backend=name
                )
    x_cpu = t["x"]
    assert backends.select("auto", x_cpu, t["weight"], 4) == "torch"


def test_autocast_runs_in_the_autocast_dtype():
    t = layer_inputs(16, 32, 24, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = subspace_linear(t["x"], t["weight"], t["bias"], t["U"], t["V"], t["M"], 1.0)
    assert y.dtype == torch.bfloat16
    ref = dense_subspace_linear(
        *(t[k].double() for k in ("x", "weight", "bias", "U", "V", "M")), 1.0
    )
    assert_close(y, ref, torch.bfloat16, "y under autocast")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_match_float64(dtype):
    """The fp32-accumulating low-precision path of the torch backend, forward and both gradients."""
    t = layer_inputs(48, 40, 36, 6, seed=21)
    low = {k: (v.to(dtype) if k != "M" else v.clone()) for k, v in t.items()}
    x = low["x"].clone().requires_grad_()
    M = low["M"].requires_grad_()
    y, _ = subspace_linear(x, low["weight"], low["bias"], low["U"], low["V"], M, 2.0, "torch")
    dy = torch.randn(48, 36, dtype=torch.float64)
    y.backward(dy.to(dtype))
    ref = {k: v.detach().double() for k, v in low.items()}
    x64 = ref["x"].requires_grad_()
    M64 = ref["M"].requires_grad_()
    y64 = dense_subspace_linear(x64, ref["weight"], ref["bias"], ref["U"], ref["V"], M64, 2.0)
    y64.backward(dy.to(dtype).double())
    assert_close(y, y64, dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "dx")
    # z is saved in the input dtype (as LoRA saves x), so dM carries that rounding.
    assert_close(M.grad, M64.grad, dtype, "dM")
