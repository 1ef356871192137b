"""Backend choice by measurement (attrspace.backends.choice) with an injected timer: what is timed,
what is remembered in memory and on disk, corrupt cache files, the forcing environment variable, and
torch.compile seeing a constant. No timing is asserted: the fake timer decides who is fastest."""

import json
import types

import pytest
import torch

import attrspace
from attrspace import backends
from attrspace.adapters.functional import subspace_linear
from attrspace.backends import choice as measured
from attrspace.backends import registry, torch_backend
from attrspace.testing import layer_inputs


def _fake_backend(calls: list, fail: bool = False):
    """A backend module honouring the contract by delegating to the torch backend."""

    def forward(*args):
        calls.append("forward")
        if fail:
            raise RuntimeError("launch failed")
        return torch_backend.forward(*args)

    def backward(*args):
        calls.append("backward")
        return torch_backend.backward(*args)

    return types.SimpleNamespace(
        unavailable_reason=lambda: None,
        unsupported_reasons=lambda x, w, k: [],
        forward=forward,
        backward=backward,
    )


class FakeTimer:
    """Runs the step once (so the backend really executes) and reports the next scripted time."""

    def __init__(self, seconds):
        self.seconds = list(seconds)
        self.calls = 0

    def __call__(self, step, device):
        step()
        self.calls += 1
        return self.seconds.pop(0)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Registers backend "fake" beside "torch", points the cache at tmp_path, clears memory."""
    calls = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(backends.ENV_FORCE, raising=False)
    monkeypatch.setitem(backends._MODULES, "fake", "tests.fake")
    monkeypatch.setitem(registry._LOADED, "fake", _fake_backend(calls))
    monkeypatch.setitem(registry._UNAVAILABLE, "fake", None)
    monkeypatch.setattr(backends, "candidates", lambda x, w, k: ["torch", "fake"])
    measured.forget()
    yield calls
    measured.forget()


def test_a_fast_backend_with_wrong_results_is_never_chosen(fake, monkeypatch):
    wrong = types.SimpleNamespace(
        unavailable_reason=lambda: None,
        unsupported_reasons=lambda x, w, k: [],
        forward=lambda *a: tuple(t * 1.01 for t in torch_backend.forward(*a)),
        backward=torch_backend.backward,
    )
    monkeypatch.setitem(registry._LOADED, "fake", wrong)
    timer = FakeTimer([0.003])  # only torch is timed
    monkeypatch.setattr(measured, "default_timer", timer)
    t = _inputs()
    with pytest.warns(UserWarning, match=r"fake: y differs from the torch backend by 1\.0\de-02"):
        assert backends.select("auto", t["x"], t["weight"], 4) == "torch"
    assert timer.calls == 1
    # An explicit choice still runs it: only "auto" guards against it.
    assert backends.select("fake", t["x"], t["weight"], 4) == "fake"


def _inputs(tokens=24):
    return layer_inputs(tokens, 16, 12, 4, seed=tokens)


def test_token_bucket():
    assert [measured.token_bucket(t) for t in (1, 2, 3, 1369, 10952)] == [1, 2, 4, 2048, 16384]


def test_fastest_wins_is_remembered_and_written(fake, tmp_path, monkeypatch):
    timer = FakeTimer([0.003, 0.001])  # torch, then fake
    monkeypatch.setattr(measured, "default_timer", timer)
    t = _inputs()
    assert backends.select("auto", t["x"], t["weight"], 4) == "fake"
    # once checked against the torch backend, once timed
    assert timer.calls == 2 and fake == ["forward", "backward"] * 2
    # Same key (24 and 30 tokens share the bucket 32): no second timing.
    assert backends.select("auto", _inputs(30)["x"], t["weight"], 4) == "fake"
    assert timer.calls == 2
    data = json.loads((tmp_path / "attrspace" / measured.CACHE_FILE).read_text())
    assert data["version"] == measured.CACHE_VERSION
    [entry] = data["entries"]
    assert entry["backend"] == "fake" and entry["bucket"] == 32
    assert entry["times_ms"] == pytest.approx({"torch": 3.0, "fake": 1.0})
    # A new process (memory forgotten) reads the file instead of timing again.
    measured.forget()
    assert backends.select("auto", t["x"], t["weight"], 4) == "fake"
    assert timer.calls == 2
    # Another bucket is timed on its own.
    timer.seconds = [0.001, 0.002]
    assert backends.select("auto", _inputs(100)["x"], t["weight"], 4) == "torch"
    assert timer.calls == 4
    text = str(attrspace.backends())
    assert "cpu float32 16->12 K=4 T<=32: fake (fake 1.000, torch 3.000)" in text
    assert "T<=128: torch" in text


def test_corrupt_cache_is_ignored_with_a_warning_and_rewritten(fake, tmp_path, monkeypatch):
    path = tmp_path / "attrspace" / measured.CACHE_FILE
    path.parent.mkdir(parents=True)
    monkeypatch.setattr(measured, "default_timer", FakeTimer([0.002, 0.001]))
    t = _inputs()
    bad_files = [
        "{not json",
        json.dumps({"version": 99, "entries": []}),
        json.dumps({"version": 1, "entries": [{"device": "cpu"}]}),
        json.dumps(
            {
                "version": 1,
                "entries": [
                    {"device": "cpu", "dtype": "float32", "d_in": 16, "d_out": 12, "rank": 4,
                     "bucket": 32, "backend": "torch", "times_ms": {"warp": 1.0}}
                ],
            }
        ),
    ]  # fmt: skip
    for bad in bad_files:
        path.write_text(bad)
        measured.forget()
        measured.default_timer.seconds = [0.002, 0.001]
        with pytest.warns(UserWarning, match="ignoring corrupt backend-choice cache"):
            assert backends.select("auto", t["x"], t["weight"], 4) == "fake"
        assert measured._parse(path.read_text())  # rewritten, valid


def test_a_cached_choice_that_cannot_run_is_timed_again(fake, monkeypatch):
    t = _inputs()
    key = measured.key_of(t["x"], t["weight"], 4)
    measured._MEMORY[key] = measured.Choice("cuda", {"cuda": 0.1, "torch": 1.0})
    timer = FakeTimer([0.001, 0.002])
    monkeypatch.setattr(measured, "default_timer", timer)
    assert backends.select("auto", t["x"], t["weight"], 4) == "torch"
    assert timer.calls == 2


def test_a_backend_failing_while_timed_is_left_out_with_a_warning(fake, monkeypatch):
    monkeypatch.setitem(registry._LOADED, "fake", _fake_backend([], fail=True))
    monkeypatch.setattr(measured, "default_timer", lambda step, device: step() or 1.0)
    t = _inputs()
    with pytest.warns(UserWarning, match="fake: RuntimeError: launch failed"):
        assert backends.select("auto", t["x"], t["weight"], 4) == "torch"


def test_timing_leaves_the_random_stream_and_the_weight_alone(fake, monkeypatch):
    monkeypatch.setattr(measured, "default_timer", FakeTimer([0.002, 0.001]))
    t = _inputs()
    weight = t["weight"].clone()
    state = torch.random.get_rng_state()
    backends.select("auto", t["x"], t["weight"], 4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(t["weight"], weight)


def test_environment_variable_forces_a_backend(fake, monkeypatch):
    timer = FakeTimer([])
    monkeypatch.setattr(measured, "default_timer", timer)
    t = _inputs()
    monkeypatch.setenv(backends.ENV_FORCE, "torch")
    assert backends.select("auto", t["x"], t["weight"], 4) == "torch"
    assert timer.calls == 0
    monkeypatch.setitem(registry._UNAVAILABLE, "fake", "fake has no device")
    monkeypatch.setenv(backends.ENV_FORCE, "fake")
    with pytest.raises(
        ValueError, match=r"backend 'fake' \(forced by ATTRSPACE_BACKEND\) cannot run"
    ):
        backends.select("auto", t["x"], t["weight"], 4)
    monkeypatch.setenv(backends.ENV_FORCE, "fastest")
    with pytest.raises(ValueError, match="ATTRSPACE_BACKEND='fastest' names no backend"):
        backends.select("auto", t["x"], t["weight"], 4)


def test_cpu_auto_is_torch_without_timing(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(backends.ENV_FORCE, raising=False)
    monkeypatch.setattr(measured, "default_timer", FakeTimer([]))
    t = _inputs()
    assert backends.select("auto", t["x"], t["weight"], 4) == "torch"
    assert not (tmp_path / "attrspace").exists()


def test_compiled_auto_sees_the_measured_choice_as_a_constant(fake, monkeypatch):
    t = _inputs()
    M = t["M"].clone().requires_grad_()

    def layer(x, M):
        return subspace_linear(x, t["weight"], t["bias"], t["U"], t["V"], M, 2.0, "auto")[0]

    timer = FakeTimer([0.002, 0.001])
    monkeypatch.setattr(measured, "default_timer", timer)
    eager = layer(t["x"], M)  # measures: "fake" wins
    assert timer.calls == 2
    del fake[:]
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(t["x"], M)
    assert timer.calls == 2
    assert "forward" in fake  # the traced graph calls the measured winner
    torch.testing.assert_close(out, eager)
    # An unmeasured shape under compile is not timed: the first candidate runs.
    measured.forget()
    torch._dynamo.reset()
    out = torch.compile(layer, backend="aot_eager", fullgraph=True)(t["x"], M)
    assert timer.calls == 2
    torch.testing.assert_close(out, eager)
