"""The whole-model mining decomposition at VGGT-1B shapes: batched randomized SVD vs per-matrix loops.

Every adapted block layer (24 frame + 24 global blocks x qkv 3072x1024, proj 1024x1024, fc1 4096x1024,
fc2 1024x4096 = 192 layers) x 4 attributes = 768 operators, each the weighted mean of 10 LoRAs of rank 16
in factor form: P (m, 160), Q (n, 160), C = P Q^T. Rank 16, oversample 8, 2 power iterations.

Rows (group "mining decomposition, VGGT-1B shapes"):
- `batched randomized_svd [backend]`: ours, every operator in one call;
- `loop factor_svd`: a Python loop of the exact factor-form SVD per operator (torch.linalg.qr of P and Q,
  torch.linalg.svd of the 160 x 160 core): the per-matrix torch loop of issue 7;
- `loop svd_lowrank (dense)` and `loop linalg.svd (dense)`: the operator formed densely and decomposed by
  torch.svd_lowrank(q=24, niter=2) or torch.linalg.svd, timed on one block's operators and scaled to the
  768 (extra_info "scaled_from"); the full set would take minutes per round.
Accuracy: extra_info "max_rel_err" is the largest relative error of the 16 singular values against the
float64 exact factor-form SVD, over all operators. Run:
    python -m pytest bench/bench_svd.py --benchmark-json=svd.json
ATTRSPACE_BENCH_SVD_BLOCKS=4 runs fewer blocks (a quick check); the figures in RESULTS.md use all 48.
ATTRSPACE_BENCH_THREADS=N sets torch's thread count for the whole module (default: torch's own).
"""

from __future__ import annotations

import os

import pytest
import torch

from attrspace.backends import auto_rsvd_backend as auto_backend
from attrspace.backends import rsvd_unavailable_reason as unavailable_reason
from attrspace.linalg import factor_svd
from attrspace.linalg.randomized import randomized_svd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if "ATTRSPACE_BENCH_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["ATTRSPACE_BENCH_THREADS"]))
BLOCKS = int(os.environ.get("ATTRSPACE_BENCH_SVD_BLOCKS", 48))
SHAPES = {"qkv": (3072, 1024), "proj": (1024, 1024), "fc1": (4096, 1024), "fc2": (1024, 4096)}
ATTRIBUTES, LORAS, LORA_RANK, RANK = 4, 10, 16, 16
ROUNDS = int(os.environ.get("ATTRSPACE_BENCH_SVD_ROUNDS", 3))
GROUP = "mining decomposition, VGGT-1B shapes"


def attribute_factors(m: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of 10 synthetic LoRAs of one attribute in factor form: P (m, 160), Q (n, 160), float32.

    Each LoRA update s B_i A_i shares the attribute's 16 directions (with a decaying strength and a
    per-LoRA mixing) plus its own noise, so the mean has the cliff after 16 values that the paper shows.
    """
    u = torch.linalg.qr(torch.randn(m, LORA_RANK, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, LORA_RANK, generator=gen)).Q
    strength = torch.logspace(0, -1, LORA_RANK)
    ps, qs = [], []
    for _ in range(LORAS):
        mix = torch.eye(LORA_RANK) + 0.3 * torch.randn(LORA_RANK, LORA_RANK, generator=gen)
        b = 1e-3 * ((u * strength) @ mix + 0.2 * torch.randn(m, LORA_RANK, generator=gen) / m**0.5)
        a_t = 1e-2 * (v + 0.2 * torch.randn(n, LORA_RANK, generator=gen) / n**0.5)
        ps.append(2.0 * b / LORAS)  # scale s = 2, equal IRLS weights
        qs.append(a_t)
    return torch.cat(ps, 1), torch.cat(qs, 1)


@pytest.fixture(scope="module")
def ops():
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(BLOCKS):
        for m, n in SHAPES.values():
            for _ in range(ATTRIBUTES):
                p, q = attribute_factors(m, n, gen)
                out.append((p.to(DEVICE), q.to(DEVICE)))
    return out


@pytest.fixture(scope="module")
def exact(ops):
    return [factor_svd(p.double(), q.double(), RANK)[1] for p, q in ops]


def max_rel_err(results, exact) -> float:
    return max(
        float(((s.double() - e.to(s.device)) / e.to(s.device)).abs().max())
        for s, e in zip(results, exact, strict=True)
    )


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn, method: str, rounds: int = ROUNDS, warmup: int = 1, **info):
    out = {}

    def step():
        out["result"] = fn()
        _sync()

    benchmark.group = GROUP
    benchmark.extra_info.update(
        {"method": method, "device": DEVICE, "threads": torch.get_num_threads(), "flops": 0, **info}
    )
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return out["result"]


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
def test_batched_randomized_svd(benchmark, ops, exact, backend):
    reason = unavailable_reason(backend, torch.device(DEVICE))
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable here: {reason}")
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("the Triton interpreter is for tests, not for timing")
    results = _run(
        benchmark,
        lambda: randomized_svd(
            ops, RANK, backend=backend, generator=torch.Generator().manual_seed(1)
        ),
        f"batched randomized_svd [{backend}]",
        auto=auto_backend(torch.device(DEVICE)),
        operators=len(ops),
    )
    err = max_rel_err([s for _, s, _ in results], exact)
    benchmark.extra_info["max_rel_err"] = err
    assert err < 1e-3


def test_loop_factor_svd(benchmark, ops, exact):
    results = _run(benchmark, lambda: [factor_svd(p, q, RANK) for p, q in ops], "loop factor_svd",
                   operators=len(ops))  # fmt: skip
    benchmark.extra_info["max_rel_err"] = max_rel_err([s for _, s, _ in results], exact)


def _one_block(ops):
    return ops[: len(SHAPES) * ATTRIBUTES]


def test_loop_svd_lowrank_dense(benchmark, ops, exact):
    block = _one_block(ops)
    results = _run(
        benchmark,
        lambda: [torch.svd_lowrank(p @ q.T, q=RANK + 8, niter=2) for p, q in block],
        "loop svd_lowrank (dense)",
        scaled_from=len(block),
        operators=len(ops),
    )
    benchmark.extra_info["max_rel_err"] = max_rel_err(
        [s[:RANK] for _, s, _ in results], exact[: len(block)]
    )


def test_loop_linalg_svd_dense(benchmark, ops, exact):
    block = [_one_block(ops)[i * ATTRIBUTES] for i in range(len(SHAPES))]  # one operator per shape
    results = _run(
        benchmark,
        lambda: [torch.linalg.svd(p @ q.T, full_matrices=False) for p, q in block],
        "loop linalg.svd (dense)",
        rounds=1,
        warmup=0,
        scaled_from=len(block),
        operators=len(ops),
    )
    benchmark.extra_info["max_rel_err"] = max_rel_err(
        [s[:RANK] for _, s, _ in results], [exact[i * ATTRIBUTES] for i in range(len(SHAPES))]
    )
