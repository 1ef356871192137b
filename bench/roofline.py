"""Roofline prediction of one SubspaceLinear forward + backward per backend and VGGT layer shape, from
the launches the code makes (tests/backends/test_launch_counts.py counts them on the CPU).

    python bench/roofline.py            # the markdown table of bench/RESULTS.md

Each launch costs max(FLOPs / matmul ceiling, bytes / memory bandwidth) / efficiency + LAUNCH_US, where
the bytes are what the launch must move through HBM (each operand read once, each output written
once; re-reads that L2 serves are not counted) and the efficiency is the fraction of the ceiling the
launch's instructions can reach (1 for cuBLAS and the Triton kernels' wgmma path, MMA_SYNC for the CUDA
backend's mma.sync kernels on Hopper). Ceilings as measured on the lent machines (KINDS.md): bf16
matrix products about 800 TFLOP/s on both, copies 3.0 TB/s (H100) and 4.3 TB/s (H200). Nothing here
was measured on a GPU: it is the prediction a GPU run is compared with.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

TOKENS = 8 * 1369
RANK = 64
SHAPES = {"qkv": (1024, 3072), "proj": (1024, 1024), "fc1": (1024, 4096), "fc2": (4096, 1024)}
MACHINES = {"H100": (800e12, 3.0e12), "H200": (800e12, 4.3e12)}
LAUNCH_US = (
    3.0  # a launch's fixed cost on the stream (driver + ramp-up + tail), stated, not measured
)
MMA_SYNC = 0.625  # mma.sync reaches about 60-65% of wgmma's rate on Hopper
# Exact fp32 products (P, Q and the dM parts in both kernel backends) run on the FMA units: the
# H100 SXM's 67 TFLOP/s of fp32 against the 800 TFLOP/s matrix ceiling, so each such FLOP is charged
# as 12 matrix FLOPs (a stated ratio, not measured).
FMA_COST = 12.0
BF16, FP32 = 2, 4


@dataclass
class Launch:
    name: str
    flops: float
    bytes: float
    efficiency: float = 1.0

    def seconds(self, peak: float, bandwidth: float) -> float:
        work = max(self.flops / peak, self.bytes / bandwidth) / self.efficiency
        return work + LAUNCH_US * 1e-6


def gemm(name: str, m: int, k: int, n: int, a=BF16, b=BF16, c=BF16, eff=1.0) -> Launch:
    return Launch(name, 2.0 * m * k * n, m * k * a + k * n * b + m * n * c, eff)


def small(name: str, elements: float, width=FP32) -> Launch:
    """An elementwise op or a copy: reads and writes `elements`."""
    return Launch(name, elements, 2 * elements * width)


def frozen(d_in: int, d_out: int, T: int = TOKENS) -> list[Launch]:
    """nn.Linear, weight frozen: y = x W^T + b forward, dx = dy W backward."""
    return [gemm("y", T, d_in, d_out), gemm("dx", T, d_out, d_in)]


def triton(d_in: int, d_out: int, T: int = TOKENS, K: int = RANK) -> list[Launch]:
    """One launch each way (kernels/subspace_linear.py): the forward reads x once for [W ; V^T]
    (d_out + K columns) and adds z P^T as K more inner steps, P formed by its first programs; the
    backward likewise with [W^T ; U], g Q^T and dM = s g^T z (z read, g written in fp32)."""
    fwd = gemm("y,z,P", T, d_in, d_out + K)
    fwd.flops += 2.0 * T * K * d_out + FMA_COST * 2.0 * d_out * K * K
    fwd.bytes += T * K * BF16 + d_out * K * (BF16 + FP32)  # z out, U in, P scratch
    bwd = gemm("dx,g,Q,dM", T, d_out, d_in + K)
    bwd.flops += 2.0 * T * K * d_in + FMA_COST * 2.0 * (T * K * K + d_in * K * K)
    bwd.bytes += T * K * (FP32 + BF16) + d_in * K * (BF16 + FP32)  # g out, z in, V in, Q scratch
    return [fwd, bwd]


def torch_concat(d_in: int, d_out: int, T: int = TOKENS, K: int = RANK) -> list[Launch]:
    """The torch backend in bf16 on a GPU (attrspace/backends/torch_backend.py): P, z, [x | z], P into
    the persistent [W | P], one GEMM; Q, g, Q^T into the buffer, [dy | g], one GEMM, g widened, dM."""
    return [
        small("U.float", d_out * K), gemm("U M", d_out, K, K, FP32, FP32, FP32),
        small("* s", d_out * K), gemm("z", T, d_in, K), small("cat x,z", T * (d_in + K), BF16),
        small("P into buffer", d_out * K, BF16), gemm("y", T, d_in + K, d_out),
        small("V.float", d_in * K), gemm("V M^T", d_in, K, K, FP32, FP32, FP32),
        small("* s", d_in * K), gemm("g", T, d_out, K), small("Q^T into buffer", d_in * K, BF16),
        small("cat dy,g", T * (d_out + K), BF16), gemm("dx", T, d_out + K, d_in),
        small("g.float", T * K), small("z.float", T * K),
        gemm("g^T z", K, T, K, FP32, FP32, FP32), small("* s", K * K),
    ]  # fmt: skip


def cuda(d_in: int, d_out: int, T: int = TOKENS, K: int = RANK) -> list[Launch]:
    """The CUDA backend (csrc/): one mma.sync launch each way, no memset (its rank-K epilogue in TF32),
    P formed by the forward's first blocks, Q by the backward's, and dM = s g^T z reduced inside the
    backward (tests/backends/test_launch_counts.py). Bytes as triton(), plus z32 (the forward's fp32
    z, written and read back) and the dM parts (a K x K fp32 slot per row block of 128 rows)."""
    fwd = gemm("y,z,P kernel", T, d_in, d_out + K, eff=MMA_SYNC)
    fwd.flops += 2.0 * T * K * d_out + FMA_COST * 2.0 * d_out * K * K * MMA_SYNC
    fwd.bytes += T * K * (BF16 + 2 * FP32) + d_out * K * (BF16 + FP32)  # z, z32, U in, P scratch
    bwd = gemm("dx,g,Q,dM kernel", T, d_out, d_in + K, eff=MMA_SYNC)
    bwd.flops += 2.0 * T * K * d_in + FMA_COST * 2.0 * (T * K * K + d_in * K * K) * MMA_SYNC
    parts = -(-T // 128) * K * K * FP32 * 2  # written, then read by the last tile
    bwd.bytes += T * K * (FP32 + BF16) + d_in * K * (BF16 + FP32) + parts
    return [fwd, bwd]


BACKENDS = {"triton": triton, "torch": torch_concat, "cuda": cuda}


def predict(machine: str) -> dict[str, dict[str, tuple[float, int]]]:
    """{layer: {method: (microseconds, launches)}} on `machine`."""
    peak, bandwidth = MACHINES[machine]
    out = {}
    for layer, (d_in, d_out) in SHAPES.items():
        rows = {"frozen": frozen(d_in, d_out)}
        rows.update({name: fn(d_in, d_out) for name, fn in BACKENDS.items()})
        out[layer] = {
            name: (sum(x.seconds(peak, bandwidth) for x in launches) * 1e6, len(launches))
            for name, launches in rows.items()
        }
    return out


def table() -> list[str]:
    lines = [
        "| machine | layer | frozen us | triton us (x frozen) | torch us (x frozen) "
        "| cuda us (x frozen) | launches triton / torch / cuda |",
        "|---|---|---|---|---|---|---|",
    ]
    for machine in MACHINES:
        for layer, rows in predict(machine).items():
            base = rows["frozen"][0]
            cells = [f"{rows[b][0]:.0f} ({rows[b][0] / base:.2f})" for b in BACKENDS]
            counts = " / ".join(str(rows[b][1]) for b in BACKENDS)
            d_in, d_out = SHAPES[layer]
            lines.append(
                f"| {machine} | {layer} {d_in}->{d_out} | {base:.0f} | "
                + " | ".join(cells)
                + f" | {counts} |"
            )
    return lines


if __name__ == "__main__":
    print("\n".join(table()))
    sys.exit(0)
