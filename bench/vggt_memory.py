"""Saved-activation bytes of one VGGT-1B training step, counted on the meta device (exact, seconds
on a CPU; attrspace.measure.memory_meta says what is counted and how attention is counted as flash does).

    python bench/vggt_memory.py [--frames 8] [--size 518]   -> a markdown table for bench/RESULTS.md

Setting: the aggregator (DINOv2 patch embed, 24 frame + 24 global blocks) in bf16, the camera and
depth heads in fp32 (as the official forward runs them under autocast), point head off, batch 1.
Methods adapt the 192 block linears (qkv, proj, fc1, fc2 of every frame and global block):
- frozen: no adapter; the gradient flows from the loss down to the patch-embed output (what any
  adapter of the blocks needs at least), nothing else trains;
- SubspaceLinear K=16 / K=64 (a random orthonormal bank) on the block linears;
- LoRA r=16 on the block linears.
Every method runs with gradient checkpointing off and on (non-reentrant, per block, as the model does).
"""

from __future__ import annotations

import argparse
import sys

import torch

import attrspace
from attrspace.bank import linear_shapes, random_bank
from attrspace.measure.memory_meta import step_saved_bytes
from attrspace.models.vggt import VGGT, VGGTConfig, aggregator
from attrspace.models.vggt.params import block_linear_names

GIB = 2**30


def build(
    method: str,
    checkpointing: bool,
    config: VGGTConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> VGGT:
    """VGGT on meta with the aggregator in `dtype` and `method`'s adapters on the block linears."""
    config = config or VGGTConfig.vggt_1b(enable_point=False)
    with torch.device("meta"):
        model = VGGT(config)
    model.set_gradient_checkpointing(checkpointing)  # the aggregator blocks and the heads
    model.aggregator.to(dtype)
    model.requires_grad_(False)
    targets = tuple(block_linear_names(model))
    if method.startswith("subspace"):
        rank = int(method.split("K=")[1])
        shapes = linear_shapes(model, targets)
        bank = random_bank(shapes, rank, scale=2.0, dtype=dtype)
        attrspace.inject(model, bank)
    elif method.startswith("lora"):
        attrspace.inject_lora(model, targets, rank=16, alpha=32)
    return model


def step_bytes(model: VGGT, frames: int, size: int, images: torch.Tensor | None = None) -> dict:
    """step_saved_bytes of one training step on (1, frames, 3, size, size) meta images (or `images`)."""
    if images is None:
        dtype = next(model.aggregator.parameters()).dtype
        images = torch.empty(1, frames, 3, size, size, device="meta", dtype=dtype)
    model.train()
    handle = None
    if not any(p.requires_grad for p in model.parameters()):
        # frozen: the patch-embed output requires grad, so backward runs through every block.
        handle = model.aggregator.patch_embed.register_forward_hook(
            lambda m, i, out: out.detach().requires_grad_()
        )

    def loss():
        out = model(images)
        return out["pose_enc"].sum() + out["depth"].sum() + out["depth_conf"].sum()

    try:
        return step_saved_bytes(model, loss, checkpoint_modules=(aggregator,))
    finally:
        if handle is not None:
            handle.remove()


METHODS = ("frozen", "subspace K=16", "subspace K=64", "lora r=16")


def table(frames: int, size: int, config: VGGTConfig | None = None) -> dict:
    rows = {}
    for checkpointing in (False, True):
        for method in METHODS:
            model = build(method, checkpointing, config)
            rows[(method, checkpointing)] = step_bytes(model, frames, size)
    return rows


def markdown(rows: dict, frames: int, size: int) -> str:
    lines = [
        f"**VGGT-1B, one training step, {frames} frames x {size} px, batch 1** (meta device, exact)",
        "",
        "| method | checkpointing | saved by autograd GiB | checkpoint inputs GiB | total GiB "
        "| / LoRA r=16 |",
        "|---|---|---|---|---|---|",
    ]
    for (method, ckpt), r in rows.items():
        lora = rows[("lora r=16", ckpt)]["total"]
        lines.append(
            f"| {method} | {'on' if ckpt else 'off'} | {r['saved'] / GIB:.2f} | "
            f"{r['checkpoint'] / GIB:.2f} | {r['total'] / GIB:.2f} | {r['total'] / lora:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=518)
    args = parser.parse_args(argv)
    print(markdown(table(args.frames, args.size), args.frames, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
