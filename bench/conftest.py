"""Benchmark settings: device, token count, rounds; and a timing helper that synchronises CUDA."""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# VGGT fine-tuning sees 8 frames x 1369 tokens per layer call on a GPU; the CPU runs a smaller T.
TOKENS = int(os.environ.get("ATTRSPACE_BENCH_T", 8 * 1369 if DEVICE == "cuda" else 4096))
DTYPE = getattr(
    torch, os.environ.get("ATTRSPACE_BENCH_DTYPE", "bfloat16" if DEVICE == "cuda" else "float32")
)
ROUNDS = int(os.environ.get("ATTRSPACE_BENCH_ROUNDS", 20 if DEVICE == "cuda" else 7))


def machine() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return (
        f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def run(benchmark):
    """run(step, setup=None, **info): time step() with pytest-benchmark, synchronised, with extra info."""

    def _run(step, setup=None, **info):
        def timed():
            step()
            sync()

        benchmark.extra_info.update(
            {"device": DEVICE, "machine": machine(), "dtype": str(DTYPE), **info}
        )
        benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=2, iterations=1)

    return _run
