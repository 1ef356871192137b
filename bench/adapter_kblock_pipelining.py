"""Does Triton's software pipeliner keep a TMA + wgmma main loop pipelined when the adapter term is
its last k-block ([x | z] [W | P]^T in one loop, the k-block reading other tensors than the rest)?

Compiles two minimal loops ahead of time for sm_90a (no GPU needed), bf16, a 128 x 256 x 64 tile,
8 warps, 3 stages, as the fused kernel's largest config: `plain` (the main loop as in
kernels/subspace_linear._tile_product_tma) and `kblock` (the same loop one k-block longer, whose
last iteration loads z and P through their own descriptors), and prints what the TTGIR shows of
each: TMA copies and barrier waits, the shared-memory ring, and how many wgmma stay in flight.

    env -u TRITON_INTERPRET python bench/adapter_kblock_pipelining.py
"""

from __future__ import annotations

import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BM, BN, BR = 128, 256, 64


@triton.jit
def plain(a_desc, b_desc, out_ptr, R, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        acc = tl.dot(a_desc.load([0, r0]), b_desc.load([r0, 0]), acc)
    tl.store(out_ptr + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :], acc)


@triton.jit
def kblock(
    a_desc, b_desc, z_desc, p_desc, out_ptr, R,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R + BR, BR):
        if r0 < R:
            a = a_desc.load([0, r0])
            b = b_desc.load([r0, 0])
        else:  # the adapter term: z (BM x K) times P^T (K x BN), K = BR
            a = z_desc.load([0, 0])
            b = p_desc.load([0, 0])
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :], acc)


def compile_sm90a(fn, tiles: dict[str, tuple[int, int]]):
    names = fn.arg_names
    signature = {n: f"tensordesc<bf16[{r},{c}]>" for n, (r, c) in tiles.items()}
    signature.update(out_ptr="*fp32", R="i32", BM="constexpr", BN="constexpr", BR="constexpr")
    constexprs = {(names.index(k),): v for k, v in (("BM", BM), ("BN", BN), ("BR", BR))}
    aligned = [["tt.divisibility", 16]]
    attrs = {(names.index("R"),): aligned, (names.index("out_ptr"),): aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": 8, "num_stages": 3}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def main() -> None:
    a_b = {"a_desc": (BM, BR), "b_desc": (BR, BN)}
    for fn, tiles in ((plain, a_b), (kblock, {**a_b, "z_desc": (BM, BR), "p_desc": (BR, BN)})):
        compiled = compile_sm90a(fn, tiles)
        ttgir = compiled.asm["ttgir"]
        rings = re.findall(r"memdesc<(\d+)x\d+x\d+xbf16", ttgir)
        in_flight = sorted({int(p) for p in re.findall(r"pendings = (\d+)", ttgir)})
        print(
            f"{fn.__name__}: {ttgir.count('async_tma_copy_global_to_local')} TMA copies, "
            f"{ttgir.count('ttng.wait_barrier')} barrier waits, operand ring depth "
            f"{max(map(int, rings), default=1)}, wgmma left in flight at a wait {in_flight}, "
            f"shared memory {compiled.metadata.shared} B"
        )


if __name__ == "__main__":
    main()
