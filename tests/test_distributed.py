"""Adapters under DDP and FSDP2: 2 ranks (gloo, CPU) against one process.

One spawn runs every scenario of tests/distributed_worker.py (DDP; FSDP2 fp32 with activation
checkpointing; FSDP2 with a bf16 MixedPrecisionPolicy) and the helpers of attrspace.distributed on
each; the tests here compare what rank 0 saved with the single-process reference.
"""

from __future__ import annotations

import copy
import time

import distributed_worker as worker
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import attrspace
from attrspace import distributed as adist
from attrspace.adapters import discovery

FP32_RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    ranks = mp.start_processes(worker.worker, (2, str(out)), nprocs=2, join=False)
    # A collective that one rank never enters would hang both forever: give up after 10 minutes
    # (a normal run takes well under one) instead of stalling the whole suite.
    deadline = time.monotonic() + 600
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the 2-rank run did not finish within 600 s (a rank is stuck)")
    results = torch.load(out / "results.pt", weights_only=False)
    results["dir"] = out
    return results


@pytest.fixture(scope="module")
def ref():
    return worker.reference()


def _assert_same_training(got: dict, want: dict, rtol: float) -> None:
    assert len(got["grads"]) == len(want["grads"])
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"], strict=True)):
        assert set(g) == set(w)
        for name in w:
            assert _rel(g[name], w[name]) <= rtol, f"step {step}: gradient of {name}"
    for name, value in want["params"].items():
        assert _rel(got["params"][name], value) <= rtol, f"trained {name}"


def _assert_same_adapters(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for layer, entry in want.items():
        assert set(got[layer]) == set(entry), layer
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert got[layer][key].dtype == value.dtype, f"{layer}.{key}"
                assert got[layer][key].device.type == "cpu"
                assert _rel(got[layer][key], value) <= FP32_RTOL, f"{layer}.{key}"
            else:
                assert got[layer][key] == value, f"{layer}.{key}"


def _assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert _rel(got[key], value) <= FP32_RTOL, key


def test_trainable_tensors_are_m_and_lora(ref):
    names = set(ref["fp32"]["params"])
    assert len(names) == 8 + 4
    assert all(n.endswith(".M") for n in names if n.startswith("blocks."))
    assert {f"{m}.lora_{ab}.weight" for m in ("stem", "head") for ab in "AB"} <= names


def test_ddp_steps_equal_one_process(runs, ref):
    _assert_same_training(runs["ddp"], ref["fp32"], FP32_RTOL)


def test_ddp_sends_gradients_of_trainable_tensors_only(runs):
    ddp = runs["ddp"]
    # Frozen bases are parameters without grad: not buffers (nothing to re-broadcast before each
    # forward) and not in DDP's gradient buckets.
    assert ddp["buffers_broadcast"] == []
    assert ddp["traffic"]["broadcast_bytes"] == 0
    assert ddp["traffic"]["allreduce_bytes"] == worker.STEPS * ddp["trainable_bytes"]


def test_fsdp2_fp32_steps_equal_one_process(runs, ref):
    assert runs["fsdp2"]["sharded"]
    _assert_same_training(runs["fsdp2"], ref["fp32"], FP32_RTOL)


def test_merge_on_shards_points_to_the_gathering_helpers(runs):
    refusals = runs["fsdp2"]["refusals"]
    for call in ("merge", "delta_weight", "uninject"):
        assert "merged_state_dict" in refusals[call], (call, refusals[call])
    assert refusals["still_adapted"] == "SubspaceLinear"


def test_fsdp2_bf16_policy_keeps_fp32_master_m(runs, ref):
    got, bf16, fp32 = runs["fsdp2_bf16"], ref["bf16"], ref["fp32_one_step"]
    assert got["output_dtype"] == torch.float32
    for name, (dtype, grad_dtype) in got["dtypes"].items():
        assert dtype == torch.float32 and grad_dtype == torch.float32, name
    # bf16 tolerance, flash-attention's rule: against the fp32 gradients, FSDP2's bf16 run may be
    # at most twice as far off as a single process computing in bf16 (plus a floor of 1e-3), and
    # the two bf16 runs agree with each other to 3e-2.
    for name, want in fp32["grads"][0].items():
        ours = _rel(got["grads"][0][name], want)
        single = _rel(bf16["grads"][0][name], want)
        assert ours <= 2 * single + 1e-3, f"{name}: {ours:.2e} vs single-process bf16 {single:.2e}"
        assert _rel(got["grads"][0][name], bf16["grads"][0][name]) <= 3e-2, name
        if not name.endswith("lora_A.weight"):  # zero while lora_B is zero at the first step
            assert single > 0, f"{name}: the bf16 reference did not compute in bf16"


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2"])
def test_full_adapter_state_gathers_whole_tensors(runs, ref, scenario):
    _assert_same_adapters(runs[scenario]["adapter_state"], ref["adapter_state"])
    entry = runs[scenario]["adapter_state"]["blocks.0.attn.qkv"]
    assert entry["U"].shape == (3 * worker.DIM, 4) and entry["M"].dtype == torch.float32


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2"])
def test_merged_state_dict_gathers_and_folds(runs, ref, scenario):
    _assert_same_state(runs[scenario]["merged"], ref["merged"])


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2"])
def test_save_adapter_from_rank0_is_the_single_process_export(runs, ref, scenario, tmp_path):
    from attrspace.export.peft_folder import load_peft
    from attrspace.export.writers import export_peft

    run = runs[scenario]
    got = load_peft(runs["dir"] / run["adapter"])
    want = load_peft(export_peft(ref["model"], tmp_path / "single"))
    assert list(got) == list(want)
    for name, factors in want.items():
        assert got[name].scale == factors.scale, name
        assert _rel(got[name].A, factors.A) <= FP32_RTOL, name
        assert _rel(got[name].B, factors.B) <= FP32_RTOL, name
    # Rank 0 could not write: both ranks raised, with rank 0's reason.
    assert all(r is not None and "not a folder" in r for r in run["failed_save_raised"])


def test_saved_adapter_runs_in_plain_peft(runs, ref):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = worker.TinyNet()  # the same base weights as worker.build(), not adapted
    served = peft.PeftModel.from_pretrained(base, str(runs["dir"] / "adapter_fsdp2"))
    x, _ = worker.batch()
    with torch.no_grad():
        want = ref["model"](x)
        got = served(x)
        with served.disable_adapter():
            plain = served(x)
    assert _rel(got, want) <= FP32_RTOL
    assert _rel(plain, want) > 1e-3  # the adapter does change the output


def test_merged_state_dict_equals_uninject_merge(ref):
    model = worker.build()
    worker.train(model, *worker.batch())
    merged = adist.merged_state_dict(model)
    plain = copy.deepcopy(model)
    attrspace.uninject(plain, merge=True)
    want = plain.state_dict()
    assert list(merged) == list(want)
    for key, value in want.items():
        assert torch.equal(merged[key], value), key
    _assert_same_state(merged, ref["merged"])
    # A merged layer saves its unmerged weight, so merging first changes nothing.
    model.blocks[0].attn.qkv.merge()
    again = adist.merged_state_dict(model)
    assert torch.equal(again["blocks.0.attn.qkv.weight"], merged["blocks.0.attn.qkv.weight"])


class _FSDP1StandIn:
    """FSDP1 needs an accelerator to be built, so the refusal is checked on its module layout."""

    @staticmethod
    def wrap(module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
        nn.Module.__init__(wrapper)
        wrapper._fsdp_wrapped_module = module
        return wrapper


def test_fsdp1_is_refused_with_a_pointer_to_fsdp2():
    model = worker.build()
    model.blocks[1] = _FSDP1StandIn.wrap(model.blocks[1])
    with pytest.raises(TypeError, match=r"FSDP1.*blocks\.1\.attn\.qkv.*fully_shard"):
        adist.check_wrapping(model)
    with pytest.raises(TypeError, match="FSDP1"):
        adist.full_adapter_state(model)
    adist.check_wrapping(worker.build())  # no FSDP1 unit: accepted


def test_wrapper_names_are_the_plain_names():
    assert discovery.clean_name("_orig_mod.blocks.0._checkpoint_wrapped_module.attn.qkv") == (
        "blocks.0.attn.qkv"
    )
    model = worker.build()
    compiled = torch.compile(model)
    assert discovery.unwrap(compiled) is model
    assert list(discovery.adapter_modules(compiled)) == list(discovery.adapter_modules(model))


def test_fsdp_units_of_vggt_are_its_blocks_and_heads():
    from attrspace.models.vggt import VGGT, VGGTConfig

    with torch.device("meta"):
        model = VGGT(VGGTConfig.vggt_1b(enable_point=False))
    units = adist.fsdp_units(model)
    assert len(units) == 24 + 48 + 4 + 2
    assert units[:2] == ["aggregator.patch_embed.blocks.0", "aggregator.patch_embed.blocks.1"]
    assert {"aggregator.frame_blocks.23", "aggregator.global_blocks.0", "camera_head"} <= set(units)
    assert {"depth_head", "camera_head.trunk.3"} <= set(units)
    assert adist.fsdp_units(worker.build()) == ["blocks.0", "blocks.1"]


def test_fully_shard_model_refuses_bad_units():
    with pytest.raises(ValueError, match="no FSDP unit"):
        adist.fully_shard_model(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"blocks\.7"):
        adist.fully_shard_model(worker.build(), units=["blocks.7"])


def _checkpoint_wrapped() -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = worker.build()
    model.blocks[0] = checkpoint_wrapper(model.blocks[0])
    return model


def test_merged_state_dict_drops_wrapper_names():
    wrapped, plain = _checkpoint_wrapped(), worker.build()
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_modules())
    got, want = adist.merged_state_dict(wrapped), adist.merged_state_dict(plain)
    assert list(got) == list(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert list(adist.full_adapter_state(wrapped)) == list(adist.full_adapter_state(plain))


def test_save_adapter_refuses_names_peft_would_not_find(tmp_path):
    with pytest.raises(ValueError, match=r"blocks\.0\._checkpoint_wrapped_module\.attn\.qkv"):
        adist.save_adapter(_checkpoint_wrapped(), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
