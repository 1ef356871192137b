"""Two-rank (gloo, CPU) training runs of adapted models, and their single-process references.

tests/test_distributed.py spawns `worker` on 2 ranks once and compares what rank 0 saved with
`reference()`, computed in one process. The file also runs on its own under torchrun:

    torchrun --nproc_per_node=2 tests/distributed_worker.py OUT_DIR

Every scenario trains the same small model (two VGGT `Block`s, names blocks.N.attn.qkv ... as in
VGGT, a subspace bank on the 8 block linears and LoRA on `head`) on the same global batch; each
rank takes its half of the batch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import attrspace
from attrspace import distributed as adist
from attrspace.adapters import discovery
from attrspace.bank import linear_shapes, random_bank
from attrspace.models.vggt.layers import Block

DIM, TOKENS, BATCH, STEPS, LR = 32, 6, 4, 3, 0.5
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class TinyNet(nn.Module):
    """A 1x1 conv stem over the tokens laid out as a 2 x 3 grid, two pre-norm transformer blocks
    and a linear head: (B, T, DIM) -> (B, T, 8)."""

    def __init__(self, checkpointing: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(DIM, DIM, kernel_size=1)
        self.blocks = nn.ModuleList(Block(DIM, 4, mlp_ratio=2, init_values=1.0) for _ in range(2))
        self.head = nn.Linear(DIM, 8)
        self.checkpointing = checkpointing

    def forward(self, x):
        b, t, c = x.shape
        grid = x.transpose(1, 2).reshape(b, c, 2, t // 2)
        x = x + self.stem(grid).reshape(b, c, t).transpose(1, 2)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return self.head(x)


def build(checkpointing: bool = False) -> TinyNet:
    """The adapted model, identical in every process (fixed seeds)."""
    torch.manual_seed(0)
    model = TinyNet(checkpointing)
    bank = random_bank(linear_shapes(model, BLOCK_LINEARS), 4, scale=2.0, seed=1)
    attrspace.inject(model, bank, backend="torch")
    attrspace.inject_lora(model, targets=("stem", "head"), rank=2, alpha=4)
    # Nonzero M from the start, so the first step's LoRA-B and U/V-side gradients are not all zero.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, attrspace.SubspaceLinear):
                m.M.normal_(0, 0.1)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(BATCH, TOKENS, DIM, generator=g), torch.randn(BATCH, TOKENS, 8, generator=g)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {
        discovery.clean_name(n): p
        for n, p in discovery.unwrap(model).named_parameters()
        if p.requires_grad
    }


def _full(t: torch.Tensor) -> torch.Tensor:
    return adist._full(t).float().clone()


def train(model: nn.Module, x, y, steps: int = STEPS, compute_dtype=None) -> dict:
    """SGD with momentum 0.9; the gradients of every step and the trained values, in full.

    Written out rather than torch.optim.SGD, whose constructor imports torch._dynamo (seconds per
    process on a loaded 2-core machine); it works on plain tensors and DTensor shards alike.
    """
    params = _trainable(model)
    momentum = {n: torch.zeros_like(p) for n, p in params.items()}
    grads = []
    for _ in range(steps):
        for p in params.values():
            p.grad = None
        inputs = x if compute_dtype is None else x.to(compute_dtype)
        loss = (model(inputs).float() - y).square().mean()
        loss.backward()
        grads.append({n: _full(p.grad) for n, p in params.items()})
        with torch.no_grad():
            for n, p in params.items():
                momentum[n].mul_(0.9).add_(p.grad)
                p.add_(momentum[n], alpha=-LR)
    return {
        "grads": grads,
        "params": {n: _full(p) for n, p in params.items()},
        "dtypes": {n: (p.dtype, p.grad.dtype) for n, p in params.items()},
    }


def reference() -> dict:
    """The single-process results every distributed scenario is compared with."""
    x, y = batch()
    fp32 = build()
    out = {"fp32": train(fp32, x, y)}
    out["adapter_state"] = adist.full_adapter_state(fp32)
    out["merged"] = adist.merged_state_dict(fp32)
    out["model"] = fp32
    # bf16 reference: every parameter (M included) rounded to bf16 for compute, the way FSDP2's
    # param_dtype does, with fp32 copies of the first-step gradients.
    bf16 = build()
    for t in [*bf16.parameters(), *bf16.buffers()]:
        t.data = t.data.to(torch.bfloat16)
    out["bf16"] = train(bf16, x, y, steps=1, compute_dtype=torch.bfloat16)
    out["fp32_one_step"] = train(build(), x, y, steps=1)
    return out


def _shard(rank: int, world: int):
    x, y = batch()
    per = BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def _save(model: nn.Module, out_dir: str, name: str, world: int) -> dict:
    """save_adapter into out_dir/name; then once more onto a path that is a file, which rank 0
    cannot write: every rank must raise."""
    adist.save_adapter(model, os.path.join(out_dir, name))
    blocker = os.path.join(out_dir, f"{name}.blocker")
    if dist.get_rank() == 0:
        with open(blocker, "w") as f:
            f.write("not an adapter folder")
    dist.barrier()
    try:
        adist.save_adapter(model, blocker)
        raised = None
    except RuntimeError as exc:
        raised = str(exc)
    everyone = [None] * world
    dist.all_gather_object(everyone, raised)
    return {"adapter": name, "failed_save_raised": everyone}


def run_ddp(rank: int, world: int, out_dir: str) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    model = build()
    ddp = nn.parallel.DistributedDataParallel(model)
    adist.check_wrapping(ddp)
    traffic = {"broadcast_bytes": 0, "allreduce_bytes": 0}
    # DDP re-broadcasts module buffers before every forward through this method: count its bytes.
    original = ddp._distributed_broadcast_coalesced

    def counting_broadcast(tensors, *args, **kwargs):
        traffic["broadcast_bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        return original(tensors, *args, **kwargs)

    ddp._distributed_broadcast_coalesced = counting_broadcast

    def counting_allreduce(state, bucket):
        traffic["allreduce_bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    result = train(ddp, *_shard(rank, world))
    result["traffic"] = traffic
    result["buffers_broadcast"] = [n for n, _ in ddp.named_module_buffers]
    result["trainable_bytes"] = sum(
        p.numel() * p.element_size() for p in _trainable(model).values()
    )
    result["adapter_state"] = adist.full_adapter_state(ddp)
    result["merged"] = adist.merged_state_dict(ddp)
    result.update(_save(ddp, out_dir, "adapter_ddp", world))
    return result


def _fsdp2(mp_policy=None, checkpointing: bool = False) -> nn.Module:
    model = build(checkpointing)
    adist.fully_shard_model(model, mp_policy=mp_policy)
    return model


def run_fsdp2(rank: int, world: int, out_dir: str) -> dict:
    model = _fsdp2(checkpointing=True)
    result = train(model, *_shard(rank, world))
    result["sharded"] = isinstance(model.blocks[0].attn.qkv.M, torch.distributed.tensor.DTensor)
    result["adapter_state"] = adist.full_adapter_state(model)
    result["merged"] = adist.merged_state_dict(model)
    result.update(_save(model, out_dir, "adapter_fsdp2", world))
    result["refusals"] = _refusals_on_shards(model)
    return result


def _refusals_on_shards(model: nn.Module) -> dict[str, str]:
    """merge / delta_weight / uninject(merge=True) on sharded layers: their error messages, and
    whether the model was left as it was."""
    from attrspace import uninject

    layer = model.blocks[0].attn.qkv
    messages = {}
    for name, call in (
        ("merge", layer.merge),
        ("delta_weight", layer.delta_weight),
        ("uninject", lambda: uninject(model, merge=True)),
    ):
        try:
            call()
            messages[name] = "no error"
        except RuntimeError as exc:
            messages[name] = str(exc)
    messages["still_adapted"] = type(model.blocks[0].attn.qkv).__name__
    return messages


def run_fsdp2_bf16(rank: int, world: int, out_dir: str) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32
    )
    model = _fsdp2(mp_policy=policy)
    x, y = _shard(rank, world)
    result = train(model, x, y, steps=1)
    # The root returns fp32 predictions while the head (root unit) still computes in bf16 on the
    # bf16 output of the last block unit: output_dtype is applied by the root only.
    with torch.no_grad():
        result["output_dtype"] = model(x).dtype
    return result


SCENARIOS = {
    "ddp": run_ddp,
    "fsdp2": run_fsdp2,
    "fsdp2_bf16": run_fsdp2_bf16,
}


def run_all(rank: int, world: int, out_dir: str) -> None:
    results = {}
    for name, scenario in SCENARIOS.items():
        results[name] = scenario(rank, world, out_dir)
        dist.barrier()
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))


def worker(rank: int, world: int, out_dir: str) -> None:
    """Entry point of torch.multiprocessing.spawn: a gloo group over a file store in out_dir."""
    torch.set_num_threads(1)
    store = f"file://{os.path.join(out_dir, 'store')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        run_all(rank, world, out_dir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # torchrun --nproc_per_node=2 tests/distributed_worker.py OUT_DIR
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        run_all(dist.get_rank(), dist.get_world_size(), sys.argv[1])
    finally:
        dist.destroy_process_group()
