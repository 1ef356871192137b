"""The shared training loop: schedule, batching, and that it trains only what requires grad."""

import itertools
import math

import pytest
import torch

from attrspace.train.trainer import TrainConfig, batches, lr_factor


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup=0.1, final_lr_ratio=0.01)
    factors = [lr_factor(s, cfg) for s in range(cfg.steps)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[-1] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    with pytest.raises(ValueError, match="steps and batch_size"):
        TrainConfig(steps=0)


def test_batches_cover_every_scene_per_epoch():
    keys = ("images", "depths", "extrinsics", "intrinsics", "world_points", "point_masks")
    dataset = [{k: torch.full((2,), float(i)) for k in keys} for i in range(6)]
    stream = batches(dataset, batch_size=2, seed=0)
    seen = torch.cat([next(stream)["images"][:, 0] for _ in range(3)])
    assert sorted(seen.tolist()) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="empty"):
        next(batches([], 1, 0))
