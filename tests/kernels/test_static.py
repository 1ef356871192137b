"""Static checks of the GPU code on a CPU machine: every Triton autotune config (and the batched-SVD
kernels) compiled ahead of time for sm_90a and sm_80 (kernels/_aot.py), and the CUDA kernels of
csrc/ through `nvcc -Xptxas -v --resource-usage`. What runs fast on a GPU cannot be asserted here;
what makes a kernel slow by construction (no wgmma on Hopper, register spills, shared memory over the
limit) can."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def aot_report(tmp_path_factory) -> dict:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Run outside the source tree: `python -m` puts the working folder first on sys.path, and the
    # tree's attrspace/ (without kernels/, which the wheel maps in) would shadow the installed one.
    out = subprocess.run(
        [sys.executable, "-m", "attrspace.kernels._aot"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path_factory.mktemp("aot"),
        timeout=1500,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def triton_figures(aot_report) -> list[dict]:
    return aot_report["figures"]


def test_every_autotune_config_is_compiled_for_both_targets(aot_report, triton_figures):
    # Hopper tries every config; an older target at least three (kernels/_config.configs_for).
    tried = aot_report["tried_bf16"]
    assert tried["90"] == aot_report["configs"] >= 4 and tried["80"] >= 3, aot_report["tried_bf16"]
    fused = [f for f in triton_figures if f["kernel"].endswith("_fused_kernel")]
    for arch in (90, 80):
        bf16 = [f for f in fused if f["arch"] == arch and "ADAPTER_PRECISION=input" in f["config"]]
        # forward (bias, bf16 z) and backward (no bias, fp32 g) of every config, and the g-only
        # backward (no output columns) of the first
        for pass_name, count in (("forward", tried[str(arch)]), ("backward", tried[str(arch)])):
            configs = [f["config"] for f in bf16 if f["config"].startswith(pass_name + " ")]
            assert len(configs) == count, (pass_name, configs)
        assert sum(f["config"].startswith("g_only ") for f in bf16) == 1
        assert any(
            "BLOCK_N=256" in f["config"] for f in bf16 if f["config"].startswith("backward ")
        ) == (arch == 90)
    assert {f["target"] for f in triton_figures if f["arch"] == 90} == {"sm_90a"}
    assert {f["target"] for f in triton_figures if f["arch"] == 80} == {"sm_80"}


def test_tensor_core_kernels_use_wgmma_on_hopper(triton_figures):
    for f in triton_figures:
        if f["kernel"].endswith("_fused_kernel") and "PRECISION=tf32" in f["config"]:
            if f["arch"] == 90:
                assert f["wgmma"] > 0 and f["mma_sync"] == 0, f
            else:
                assert f["mma_sync"] > 0 and f["wgmma"] == 0, f


def test_hopper_main_loops_load_through_tensor_descriptors(triton_figures):
    # bf16 / fp16 forward and backward on sm_90a: bulk tensor copies (UTMALDG) feed HGMMA
    hopper = [
        f for f in triton_figures
        if f["kernel"].endswith("_fused_kernel") and f["arch"] == 90 and "TMA=True" in f["config"]
    ]  # fmt: skip
    passes = {f["config"].split()[0] for f in hopper}
    assert passes == {"forward", "backward"}, passes
    assert len(hopper) >= 16, len(hopper)  # every config of bf16 and fp16, both passes
    for f in hopper:
        assert f["tma_loads"] > 0 and f["sass_mma"] > 0 and f["wgmma"] > 0, f


def test_no_register_spills_and_shared_memory_fits(triton_figures):
    spilling = [
        f for f in triton_figures if f["spill_stores"] or f["spill_loads"] or f["local_memory"]
    ]
    assert not spilling, "\n".join(
        f"{f['kernel']} sm_{f['arch']} {f['config']}: {f['spill_stores']} B spill stores, "
        f"{f['local_memory']} LDL / STL, {f['registers']} registers"
        for f in spilling
    )
    for f in triton_figures:
        assert 0 < f["shared"] <= f["shared_limit"], f
        assert not f["wgmma_serialized"], f  # ptxas C7510: each wgmma waited for before the next


# What one SM holds (the CUDA occupancy calculator's rules for sm_80 and sm_90): 64K registers,
# allocated per warp in units of 256, that is per thread in units of 8; 64 warps; shared memory of
# 228 KiB (sm_90) or 164 KiB (sm_80), of which each resident program takes 1 KiB more than it asks.
SM_REGISTERS, SM_WARPS = 65536, 64
SM_SHARED = {90: 228 * 1024, 80: 164 * 1024}


def resident_programs(f: dict, warps: int) -> int:
    """How many programs of this compile fit on one SM at once."""
    per_warp = math.ceil(f["registers"] / 8) * 8 * 32
    by_registers = SM_REGISTERS // per_warp // warps
    by_shared = SM_SHARED[f["arch"]] // (f["shared"] + 1024)
    return min(by_registers, by_shared, SM_WARPS // warps)


def test_persistent_grid_programs_fit_on_an_sm_at_once(triton_figures):
    # The persistent grid launches SMs x PROGRAMS_PER_SM programs (kernels/subspace_linear._launch):
    # every compile of a config, forward and backward, on both targets, must hold that many on one
    # SM, so that the grid is one wave on an idle GPU (the ticket order keeps it deadlock-free
    # even when it is not).
    fused = [f for f in triton_figures if f["kernel"].endswith("_fused_kernel")]
    persistent = [f for f in fused if "PERSISTENT=True" in f["config"]]
    assert {f["config"].split()[0] for f in persistent} == {"forward", "backward"}
    assert all("PERSISTENT=False" in f["config"] for f in fused if f not in persistent)
    for f in persistent:
        per_sm = int(re.search(r"PROGRAMS_PER_SM=(\d+)", f["config"]).group(1))
        warps = int(re.search(r"\bwarps=(\d+)", f["config"]).group(1))
        assert 1 <= per_sm <= resident_programs(f, warps), (f, resident_programs(f, warps))


# The kernels a training step runs (tensor-core forward and backward); the fp32 SIMT ones too.
HOT_CUDA_KERNELS = [
    f"attrspace_{p}_{t}" for p in ("forward", "backward") for t in ("f16", "bf16", "f32")
]


def nvcc_resource_usage(arch: str) -> dict[str, dict[str, int]]:
    """{kernel: {"registers", "spill_stores", "spill_loads", "smem"}} from ptxas -v."""
    out = subprocess.run(
        ["nvcc", "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG", f"-I{ROOT / 'csrc'}",
         f"-arch={arch}", "-cubin", "-o", os.devnull, "-Xptxas", "-v", "--resource-usage",
         str(ROOT / "csrc" / "subspace_linear.cu")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    usage, current = {}, None
    for line in out.stderr.splitlines():
        if m := re.search(r"Function properties for (\w+)", line):
            current = usage.setdefault(m.group(1), {})
        elif current is not None and (m := re.search(r"(\d+) bytes spill stores, (\d+)", line)):
            current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return usage


@pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc is not on PATH (CUDA toolkit absent)"
)
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_cuda_hot_kernels_do_not_spill(arch):
    usage = nvcc_resource_usage(arch)
    assert set(HOT_CUDA_KERNELS) <= set(usage), sorted(usage)
    for name in HOT_CUDA_KERNELS:
        u = usage[name]
        assert u["spill_stores"] == 0 and u["spill_loads"] == 0, (arch, name, u)
        assert u["smem"] <= 48 * 1024, (arch, name, u)  # static shared memory, no opt-in needed
