"""Whole-model activation memory of a training step, counted exactly on the meta device.

Autograd runs on meta tensors without computing anything, so a VGGT-1B step at 8 frames x 518 px is
counted in seconds on a CPU. What a training step keeps between forward and backward is
    every tensor autograd saves for backward (saved_tensors_hooks; parameters and buffers excluded,
    a storage counted once), plus, with gradient checkpointing, the inputs each checkpointed block
    keeps for its recomputation (torch.utils.checkpoint non-reentrant stores them outside autograd's
    saved tensors, so they are counted where the model calls `checkpoint`).
Attention is counted as the flash kernel on a GPU saves it, O(T): q, k, v, the output and the fp32
log-sum-exp (B, H, T). On meta (and on a CPU) scaled_dot_product_attention takes the math path, which
saves the T x T attention matrix, so `flash_attention_accounting` swaps it for an autograd Function
that saves exactly those five tensors and computes the same output (CPU) or none (meta).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attrspace.measure.profiling import storage_key


class _FlashLikeAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v saving what FlashAttention-2 saves: q, k, v, out, lse (fp32)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if q.device.type == "meta":
            out = torch.empty_like(q)
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        else:
            acc = torch.promote_types(q.dtype, torch.float32)
            scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * q.shape[-1] ** -0.5
            lse = torch.logsumexp(scores, dim=-1)
            out = (torch.exp(scores - lse[..., None]) @ v.to(acc)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        # FlashAttention-2's backward: P recomputed from q, k and the log-sum-exp.
        q, k, v, out, lse = ctx.saved_tensors
        acc = lse.dtype
        q_, k_, v_, o_, do_ = (t.to(acc) for t in (q, k, v, out, dout))
        scale = q.shape[-1] ** -0.5
        p = torch.exp((q_ @ k_.transpose(-2, -1)) * scale - lse[..., None])
        dv = p.transpose(-2, -1) @ do_
        ds = p * (do_ @ v_.transpose(-2, -1) - (do_ * o_).sum(-1, keepdim=True)) * scale
        return (ds @ k_).to(q.dtype), (ds.transpose(-2, -1) @ q_).to(k.dtype), dv.to(v.dtype)


def _flash_like_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    if attn_mask is not None or dropout_p or is_causal or scale is not None or kw:
        raise NotImplementedError(
            "flash-attention accounting covers plain attention only (no mask, dropout, causal or "
            "custom scale), which is what the VGGT blocks call"
        )
    return _FlashLikeAttention.apply(q, k, v)


@contextlib.contextmanager
def flash_attention_accounting() -> Iterator[None]:
    """Within the block, F.scaled_dot_product_attention saves what the flash kernel saves."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_like_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def counting_checkpoint_inputs(module, seen: set, records: list) -> Iterator[None]:
    """Within the block, `module.checkpoint` (the name a model module imported) records the tensor
    arguments each checkpointed call keeps for its recomputation."""
    original = module.checkpoint

    def counted(fn, *args, **kwargs):
        for a in args:
            if isinstance(a, Tensor):
                key = storage_key(a)
                if key not in seen:
                    seen.add(key)
                    records.append((tuple(a.shape), a.dtype, a.untyped_storage().nbytes()))
        return original(fn, *args, **kwargs)

    module.checkpoint = counted
    try:
        yield
    finally:
        module.checkpoint = original


def step_saved_bytes(
    model: nn.Module, loss_fn: Callable[[], Tensor], checkpoint_modules: tuple = ()
) -> dict[str, int]:
    """Bytes a training step keeps for backward: {"saved": autograd's saved tensors, "checkpoint":
    inputs kept by checkpointed calls in `checkpoint_modules`, "total"}. Parameters and buffers of
    `model` are not activations and are left out."""
    excluded = {storage_key(t) for t in (*model.parameters(), *model.buffers())}
    seen = set(excluded)
    saved, kept = [], []

    def pack(t: Tensor):
        key = storage_key(t)
        if key not in seen:
            seen.add(key)
            saved.append(t.untyped_storage().nbytes())
        return t

    with contextlib.ExitStack() as stack:
        stack.enter_context(flash_attention_accounting())
        for m in checkpoint_modules:
            stack.enter_context(counting_checkpoint_inputs(m, seen, kept))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        loss = loss_fn()
    del loss
    total_kept = sum(n for _, _, n in kept)
    return {"saved": sum(saved), "checkpoint": total_kept, "total": sum(saved) + total_kept}
