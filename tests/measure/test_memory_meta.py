"""Whole-model activation memory on the meta device (attrspace.measure.memory_meta, bench/vggt_memory.py): the
meta count equals the count of the same step on real CPU tensors, the flash-style attention saves
O(T) and computes what scaled_dot_product_attention computes, checkpointing is counted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attrspace.measure.memory_meta import _FlashLikeAttention, flash_attention_accounting
from attrspace.measure.profiling import saved_tensor_records, storage_key

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import vggt_memory

from attrspace.models.vggt import VGGTConfig


def test_meta_storages_are_told_apart():
    a, b = torch.empty(4, device="meta"), torch.empty(4, device="meta")
    assert storage_key(a) != storage_key(b)
    assert storage_key(a) == storage_key(a.view(2, 2))


def test_flash_like_attention_matches_sdpa_and_saves_linear_memory():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(2, 3, 40, 8, generator=g, dtype=torch.float64)
    ours = _FlashLikeAttention.apply(q, k, v)
    ours.backward(dout)
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v)
    ref.backward(dout)
    torch.testing.assert_close(ours, ref)
    for got, t in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(got, t.grad)
    with flash_attention_accounting():
        records = saved_tensor_records(lambda: F.scaled_dot_product_attention(q, k, v))
    shapes = sorted(shape for shape, _, _ in records)
    assert shapes == sorted([(2, 3, 40, 8)] * 4 + [(2, 3, 40)]), shapes  # no 40 x 40 matrix
    assert F.scaled_dot_product_attention.__module__.startswith("torch")  # restored on exit


def _tiny():
    return VGGTConfig.tiny(enable_point=False)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("method", ["frozen", "subspace K=16", "lora r=16"])
def test_meta_count_equals_the_count_on_cpu_tensors(method, checkpointing):
    # fp32: in bf16 the CPU's layer norm saves its statistics in bf16, where meta (like CUDA) says
    # fp32, a difference of the CPU kernel, not of the counting.
    meta = vggt_memory.build(method, checkpointing, _tiny(), torch.float32)
    counted = vggt_memory.step_bytes(meta, frames=2, size=28)
    cpu = vggt_memory.build(method, checkpointing, _tiny(), torch.float32)
    cpu.to_empty(device="cpu")
    with torch.no_grad():
        for p in cpu.parameters():
            p.normal_(std=0.02)
    cpu.aggregator.reset_constant_buffers("cpu")
    real = vggt_memory.step_bytes(cpu, 2, 28, images=torch.rand(1, 2, 3, 28, 28))
    assert counted == real
    assert counted["total"] > 0
    assert (counted["checkpoint"] > 0) == checkpointing


def test_subspace_keeps_less_than_lora_without_checkpointing():
    rows = {
        m: vggt_memory.step_bytes(vggt_memory.build(m, False, _tiny()), 2, 28)["total"]
        for m in ("frozen", "subspace K=16", "lora r=16")
    }
    assert rows["frozen"] <= rows["subspace K=16"] < rows["lora r=16"], rows
