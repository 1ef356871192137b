"""The one line-up of a layer: the same frozen W0 in every kind, the repeated timing, and the note a
timing prints when its spread does not resolve the ratio it reports."""

import pytest
import torch

from attrspace.measure.lineup import LayerTiming, bench_layer, build_layer, format_rows


def test_every_kind_shares_the_frozen_layer_and_adds_its_update():
    x = torch.randn(5, 24)
    frozen = build_layer("frozen", 24, 40, rank=6, lora_rank=3, seed=4)
    sub = build_layer("subspace", 24, 40, rank=6, lora_rank=3, seed=4)
    lora = build_layer("lora", 24, 40, rank=6, lora_rank=3, seed=4)
    with torch.no_grad():
        expected_sub = frozen(x) + 2.0 * x @ sub.V @ sub.M.t() @ sub.U.t()
        torch.testing.assert_close(sub(x), expected_sub)
        delta = lora.scaling * x @ lora.lora_A.weight.t() @ lora.lora_B.weight.t()
        torch.testing.assert_close(lora(x), frozen(x) + delta)
        assert delta.abs().max() > 0 and (sub(x) - frozen(x)).abs().max() > 0
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match="kind must be one of"):
        build_layer("dora", 24, 40)


def test_bench_layer_repeats_and_reports_ranges():
    calls = []
    rows = bench_layer(
        48, 96, 64, rank=8, lora_rank=4, steps=2, repeats=3, progress=lambda: calls.append(1)
    )
    assert len(calls) == 9  # 3 repeats x 3 layers
    assert [r.layer for r in rows] == ["frozen nn.Linear", "SubspaceLinear", "LoRALinear"]
    assert [r.trainable for r in rows] == [0, 64, 4 * (48 + 96)]
    assert rows[1].saved_bytes == 64 * 8 * 4  # z = x V only
    for r in rows:
        assert len(r.per_repeat_ms) == 3
        assert r.ms_range[0] <= r.step_ms <= r.ms_range[1]
        assert r.ratio_range[0] <= r.ratio <= r.ratio_range[1]
    assert rows[0].ratio == 1.0
    with pytest.raises(ValueError, match="repeats"):
        bench_layer(48, 96, 64, rank=8, lora_rank=4, repeats=0)


def test_format_rows_says_when_the_spread_exceeds_the_difference():
    frozen = LayerTiming("frozen nn.Linear", 10.0, 0, 0, (9.0, 11.0), 1.0, (1.0, 1.0), [9, 10, 11])
    clear = LayerTiming("SubspaceLinear", 20.0, 64, 1, (19.0, 21.0), 2.0, (1.9, 2.1), [19, 20, 21])
    vague = LayerTiming(
        "LoRALinear", 11.7, 9, 1, (5.7, 13.1), 1.17, (0.57, 1.31), [5.7, 11.7, 13.1]
    )
    assert clear.resolved and not vague.resolved
    text = format_rows([frozen, clear, vague])
    notes = [line for line in text.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "LoRALinear / frozen varied from 0.57 to 1.31" in notes[0]
