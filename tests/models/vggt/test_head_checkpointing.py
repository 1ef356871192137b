"""Gradient checkpointing of the camera and DPT heads: the same outputs and gradients as without,
on fresh random inputs, and what a step keeps shrinks to the heads' inputs."""

from __future__ import annotations

import pytest
import torch

import attrspace
from attrspace.measure.memory_meta import step_saved_bytes
from attrspace.models.vggt import VGGT, VGGTConfig, adaptation_targets, camera_head, dpt_head


def pair(seed: int, **changes) -> tuple[VGGT, VGGT]:
    torch.manual_seed(seed)
    plain = VGGT(VGGTConfig.tiny(**changes)).train()
    ckpt = VGGT(VGGTConfig.tiny(**changes, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def loss(out: dict) -> torch.Tensor:
    total = sum(((p - 0.3) ** 2).sum() for p in out["pose_enc_list"])
    for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
        total = total + (out[key].log() if key.endswith("conf") else out[key]).square().mean()
    return total


@pytest.mark.parametrize("frames, chunk", [(2, 8), (3, 2)])
def test_same_outputs_and_gradients(frames, chunk):
    plain, ckpt = pair(frames, dpt_frames_chunk=chunk)
    assert ckpt.camera_head.gradient_checkpointing and ckpt.depth_head.gradient_checkpointing
    images = torch.rand(2, frames, 3, 28, 42, generator=torch.Generator().manual_seed(chunk))
    outs = [m(images) for m in (plain, ckpt)]
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=0, atol=0)
    for out in outs:
        loss(out).backward()
    grads = [dict((n, p.grad) for n, p in m.named_parameters()) for m in (plain, ckpt)]
    unused = {n for n, g in grads[0].items() if g is None}
    assert unused == {"aggregator.patch_embed.mask_token"}  # unused, as in the official model
    assert {n for n, g in grads[1].items() if g is None} == unused
    for name, g in grads[0].items():
        if name not in unused:
            torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_adapters_on_the_heads_get_the_same_gradients():
    plain, ckpt = pair(5)
    for model in (plain, ckpt):
        model.requires_grad_(False)
        torch.manual_seed(1)
        attrspace.inject_lora(model, adaptation_targets(model, "paper-lora").lora, rank=2)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # nonzero, so every factor gets a gradient
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
    images = torch.rand(1, 3, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    for model in (plain, ckpt):
        loss(model(images)).backward()
    trained = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert any("camera_head" in n for n in trained) and any("depth_head" in n for n in trained)
    for name, p in ckpt.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, trained[name], rtol=1e-6, atol=1e-7, msg=name)


def test_set_gradient_checkpointing_reaches_every_head_and_shrinks_the_step():
    plain, _ = pair(7)
    images = torch.rand(1, 2, 3, 28, 28)
    modules = (attrspace.models.vggt.aggregator, camera_head, dpt_head)

    def kept() -> int:
        return step_saved_bytes(plain, lambda: loss(plain(images)), modules)["total"]

    off = kept()
    plain.set_gradient_checkpointing(True)
    assert all(
        m.gradient_checkpointing
        for m in (plain.aggregator, plain.camera_head, plain.depth_head, plain.point_head)
    )
    on = kept()
    assert on < off / 3
    plain.set_gradient_checkpointing(False)
    assert not plain.camera_head.gradient_checkpointing and kept() == off
