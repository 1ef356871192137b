"""How precise the adapter term z P^T (forward) / g Q^T (backward) would be as one extra k-block of
the main loop's MMA, against the after-loop dot the fused Triton kernel uses (kernels/subspace_linear.py,
ADAPTER_PRECISIONS).

An extra k-block of [x | z] [W | P]^T feeds P (and in the backward g and Q) to the same MMA as x and
W, so in the input dtype; the after-loop dot multiplies fp32 P / Q on TF32 for fp16 inputs. Both are
emulated here in float64 with each operand rounded as the tensor cores see it (fp16 / bf16: round to
nearest, fp16 subnormals included; TF32: fp32 with the low 13 mantissa bits dropped, as wgmma reads
fp32 operands), products and sums exact: what is measured is the operands' rounding, the part that
differs between the two designs. Scales: P = s U M with M's entries of standard deviation `m_std`, the
range a fine-tune passes through from M = 0. Prints a markdown table; CPU only, a few seconds.

    python bench/adapter_kblock_precision.py
"""

from __future__ import annotations

import torch

T, D_IN, D_OUT, K, SCALE = 256, 1024, 1024, 64, 2.0
M_STDS = (1e-1, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


def tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 with the low 13 of its 23 mantissa bits cleared (TF32's 10-bit mantissa, truncated)."""
    bits = t.float().view(torch.int32) & ~((1 << 13) - 1)
    return bits.view(torch.float32).double()


def rounded(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "tf32":
        return tf32(t)
    return t.to(getattr(torch, how)).double()


def relative_error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return float((ours - exact).norm() / exact.norm())


def measure(m_std: float, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D_OUT, K, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(D_IN, K, generator=g, dtype=torch.float64))[0]
    M = torch.randn(K, K, generator=g, dtype=torch.float64) * m_std
    x = torch.randn(T, D_IN, generator=g, dtype=torch.float64)
    W = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64) / D_IN**0.5
    dy = torch.randn(T, D_OUT, generator=g, dtype=torch.float64)
    P, Q = SCALE * U @ M, SCALE * V @ M.t()  # fp32 in the kernel
    P32, Q32 = P.float().double(), Q.float().double()
    out = {}
    for dtype in ("float16", "bfloat16"):
        z = rounded(x, dtype) @ rounded(V, dtype)  # the fp32 sum, then z stored in the input dtype
        z = rounded(z, dtype)
        gg = (rounded(dy, dtype) @ rounded(U, dtype)).float().double()  # g is stored in fp32
        after = "tf32" if dtype == "float16" else dtype  # the after-loop dot (ADAPTER_PRECISIONS)
        base_y = rounded(x, dtype) @ rounded(W, dtype).t()
        for name, how in (("after-loop", after), ("k-block", dtype)):
            term = rounded(z, how) @ rounded(P32, how).t()
            exact = z @ P32.t()  # the same z: only P's (and, backward, g's) rounding differs
            out[f"{dtype} fwd {name}"] = relative_error(term, exact)
            out[f"{dtype} fwd {name} y"] = relative_error(base_y + term, base_y + exact)
            term = rounded(gg, how) @ rounded(Q32, how).t()
            out[f"{dtype} bwd {name}"] = relative_error(term, gg @ Q32.t())
    out["|P| max"] = float(P.abs().max())
    return out


def main() -> None:
    rows = [(m, measure(m)) for m in M_STDS]
    print(
        f"T = {T}, {D_IN} -> {D_OUT}, K = {K}, s = {SCALE}; relative error (Frobenius) of the adapter"
        " term (y: of base + adapter term) against the same operands unrounded; fp16 normals start at"
        " 6.1e-05"
    )
    print(
        "| std of M | max abs P | fp16 fwd after-loop (TF32) | fp16 fwd k-block (fp16) "
        "| fp16 bwd after-loop | fp16 bwd k-block | bf16 fwd after-loop (bf16) | bf16 fwd k-block "
        "| fp16 y after-loop | fp16 y k-block |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, r in rows:
        cells = [
            r[k]
            for k in (
                "float16 fwd after-loop", "float16 fwd k-block", "float16 bwd after-loop",
                "float16 bwd k-block", "bfloat16 fwd after-loop", "bfloat16 fwd k-block",
                "float16 fwd after-loop y", "float16 fwd k-block y",
            )
        ]  # fmt: skip
        print(f"| {m:.0e} | {r['|P| max']:.1e} | " + " | ".join(f"{c:.1e}" for c in cells) + " |")


if __name__ == "__main__":
    main()
