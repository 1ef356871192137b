"""The resumable loop's pieces: schedules, the batch of a step, state files that do not fit."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from attrspace.adapters.inject import inject, inject_lora
from attrspace.bank.subspace_bank import random_bank
from attrspace.train import resumable
from attrspace.train.config import resolve_config


def cfg(*overrides):
    return resolve_config(overrides=list(overrides))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_then_schedule(schedule):
    c = cfg(f"optim.schedule={schedule}", "optim.warmup=0.1", "optim.final_lr_ratio=0.01")
    factors = [resumable.lr_factor(s, 100, c) for s in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    if schedule == "constant":
        assert set(factors[10:]) == {1.0}
    else:
        assert factors[10] == pytest.approx(1.0)
        assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
        mid = factors[55]  # halfway through the decay
        assert mid == pytest.approx(0.505, abs=0.02)  # both meet at the middle
        assert factors[-1] > 0.01 and factors[-1] < 0.03


def test_epochs_count_passes_over_the_samples():
    assert resumable.total_steps(cfg("train.steps=7"), 10) == 7
    assert resumable.total_steps(cfg("train.epochs=2.5", "train.batch_size=3"), 10) == 8


def test_batch_of_a_step_depends_on_seed_and_step_only():
    per_epoch = [resumable.batch_indices(10, 3, seed=4, step=s) for s in range(3)]
    flat = [i for b in per_epoch for i in b]
    assert len(set(flat)) == 9 and all(len(b) == 3 for b in per_epoch)  # a tail of 1 left out
    assert resumable.batch_indices(10, 3, 4, 1) == per_epoch[1]
    assert resumable.batch_indices(10, 3, 4, 3) != per_epoch[0]  # epoch 1: a new permutation
    assert resumable.batch_indices(10, 3, 5, 0) != per_epoch[0]


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(4, 2))
    inject(model, random_bank({"0": (8, 8)}, 2))
    inject_lora(model, ["1"], rank=2, alpha=4)
    model[2].weight.requires_grad_(True)
    return model


def test_param_groups_and_state_round_trip(tmp_path):
    model = small_model()
    groups = resumable.param_groups(model)
    assert [n for n, _ in groups["m"]] == ["0.M"]
    assert [n for n, _ in groups["lora"]] == ["1.lora_A.weight", "1.lora_B.weight"]
    assert [n for n, _ in groups["full"]] == ["2.weight"]
    c = cfg()
    opt = resumable.build_optimizer(model, c)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    hist = resumable.History([1.0], [{"step": 1, "objective": 2.0}], 0.5)
    resumable.save_state(tmp_path / "s.safetensors", model, opt, 1, hist, "d" * 64)
    fresh = small_model()
    opt2 = resumable.build_optimizer(fresh, c)
    step, back = resumable.load_state(tmp_path / "s.safetensors", fresh, opt2, "d" * 64)
    assert step == 1 and back == hist
    for (n, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b), n
    for p, q in zip(opt.param_groups[0]["params"], opt2.param_groups[0]["params"], strict=True):
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])
    with pytest.raises(resumable.StateFileError, match="another configuration"):
        resumable.load_state(tmp_path / "s.safetensors", fresh, opt2, "e" * 64)
    other = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(4, 3))
    other[2].weight.requires_grad_(True)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(resumable.StateFileError, match="does not fit"):
        resumable.load_state(
            tmp_path / "s.safetensors", other, resumable.build_optimizer(other, c), "d" * 64
        )
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))
