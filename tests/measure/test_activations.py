"""The activation profile: region totals equal memory_meta's count and a real CPU step's, the
checkpointed step keeps exactly the blocks' and heads' inputs, and the command prints it."""

from __future__ import annotations

import pytest
import torch

from attrspace.cli.main import main
from attrspace.measure.activations import (
    REGIONS,
    build_model,
    check_profile_args,
    format_table,
    plot_rows,
    profile_activations,
    step_bytes_by_region,
)
from attrspace.measure.memory_meta import step_saved_bytes
from attrspace.models.vggt import VGGTConfig, aggregator, camera_head, dpt_head

TINY = VGGTConfig.tiny()


def _total(parts: tuple[dict, dict]) -> int:
    return sum(parts[0].values()) + sum(parts[1].values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_regions_add_up_to_memory_meta(checkpointing):
    model = build_model(TINY, "lora:4", checkpointing)
    images = torch.empty(1, 3, 3, 28, 42, device="meta", dtype=torch.bfloat16)
    parts = step_bytes_by_region(model, images)
    assert set(parts[0]) | set(parts[1]) <= set(REGIONS)

    def loss():
        out = model(images)
        keys = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
        return sum(out[k].sum() for k in keys)

    reference = step_saved_bytes(model, loss, (aggregator, camera_head, dpt_head))
    assert _total(parts) == reference["total"] > 0
    assert sum(parts[1].values()) == reference["checkpoint"]


def test_meta_count_equals_a_real_cpu_step():
    """fp32 (in bf16 the CPU's layer norm saves bf16 statistics where meta and CUDA save fp32)."""
    meta = build_model(TINY, "subspace:4", False, torch.float32)
    torch.manual_seed(0)
    cpu = meta.to_empty(device="cpu")
    cpu.aggregator.reset_constant_buffers("cpu")
    for p in cpu.parameters():
        torch.nn.init.normal_(p, std=0.02)
    images = torch.rand(1, 2, 3, 28, 28)
    real = step_bytes_by_region(cpu, images)
    counted = step_bytes_by_region(
        build_model(TINY, "subspace:4", False, torch.float32), images.to("meta")
    )
    assert real == counted


def test_checkpointed_step_keeps_exactly_the_inputs():
    s, p, c = 2, 5 + 4 * 4, TINY.embed_dim  # frames, tokens per frame (56 px), width
    (row,) = profile_activations(TINY, ["frozen"], [s], [True])
    distinct_dpt_layers = len(set(TINY.dpt_layers))
    assert row.regions == {
        "DINO": 0,
        "blocks": 2 * TINY.depth * s * p * c * 2,  # every block's bf16 input
        "camera head": s * 2 * c * 4,  # the fp32 camera tokens
        "depth head": distinct_dpt_layers * s * p * 2 * c * 2,  # bf16 layer outputs
        "point head": 0,  # the depth head's inputs, counted once
        "other": 0,
    }
    (off,) = profile_activations(TINY, ["frozen"], [s], [False])
    assert off.regions["depth head"] > 10 * row.regions["depth head"]


def test_table_plot_and_argument_checks(tmp_path):
    rows = profile_activations("tiny", ["frozen", "subspace:4", "lora:4"], [2], [False, True])
    assert len(rows) == 6 and rows[0].model == "preset tiny"
    table = format_table(rows)
    assert "| SubspaceLinear K=4 | 2 | on |" in table and "depth head GiB" in table
    assert "| DINO GiB |" in table  # shown even where it keeps nothing (frozen DINO)
    assert "point head GiB" not in table  # the tiny preset has no point head
    assert plot_rows(rows, tmp_path / "p" / "profile.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="got 'lora:0'"):
        check_profile_args("tiny", ["lora:0"], [2], None)
    with pytest.raises(ValueError, match="size 30x30 must be positive multiples of 14"):
        check_profile_args("tiny", ["frozen"], [2], 30)
    with pytest.raises(ValueError, match="frames must be positive ints"):
        check_profile_args("tiny", ["frozen"], [0], None)


def test_profile_command(tmp_path, capsys):
    png = tmp_path / "profile.png"
    args = ["profile", "--model", "tiny", "--frames", "2", "--methods", "frozen", "lora:4"]
    assert main([*args, "--checkpointing", "on", "--png", str(png)]) == 0
    out, err = capsys.readouterr()
    assert "[1/2] frozen, 2 frames, checkpointing on:" in err and "[2/2] LoRA r=4" in err
    assert "| LoRA r=4 | 2 | on |" in out and png.is_file()
    assert main(["profile", "--model", "tiny", "--size", "30"]) == 2
    assert "attrspace profile: error: size 30x30" in capsys.readouterr().err
