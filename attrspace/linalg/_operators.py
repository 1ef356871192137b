"""The operators given to `randomized_svd`: validation, grouping by shape, stacking, NaN/Inf checks
and range scaling.

An operator is either a dense matrix A: (m, n) or a factor pair (P: (m, kr), Q: (n, kr)) meaning
C = P Q^T. Operators of one kind, shape, dtype and device form a group that is decomposed by batched
operations, chunk by chunk; the caller's order is restored at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

Operator = Tensor | tuple[Tensor, Tensor]

SUPPORTED_DTYPES = (torch.float32, torch.float64)


@dataclass
class OperatorGroup:
    """Operators sharing kind, shape, dtype and device.

    `indices` are positions in the caller's list. For a dense group `kr` is 0.
    """

    factored: bool
    m: int
    n: int
    kr: int
    dtype: torch.dtype
    device: torch.device
    indices: list[int] = field(default_factory=list)


def _check_matrix(t: object, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: dtype must be float32 or float64, got {t.dtype}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{what}: empty matrix of shape {tuple(t.shape)}")
    return t


def group_operators(ops: Sequence[Operator], rank: int) -> list[OperatorGroup]:
    """Validate every operator and group them; raises TypeError/ValueError naming the operator.

    Each operator must satisfy 1 <= rank <= min(m, n).
    """
    if not isinstance(ops, (list, tuple)):
        raise TypeError(f"ops must be a list of tensors or (P, Q) pairs, got {type(ops).__name__}")
    groups: dict[tuple, OperatorGroup] = {}
    for i, op in enumerate(ops):
        if isinstance(op, Tensor):
            a = _check_matrix(op, f"op {i}")
            key = (False, a.shape[0], a.shape[1], 0, a.dtype, a.device)
        elif isinstance(op, (tuple, list)) and len(op) == 2:
            p = _check_matrix(op[0], f"op {i} (factor P)")
            q = _check_matrix(op[1], f"op {i} (factor Q)")
            if p.shape[1] != q.shape[1]:
                raise ValueError(
                    f"op {i}: P (m, kr) and Q (n, kr) need the same kr, got P {tuple(p.shape)} "
                    f"and Q {tuple(q.shape)}"
                )
            if p.dtype != q.dtype or p.device != q.device:
                raise ValueError(
                    f"op {i}: P and Q must share dtype and device, got {p.dtype} on {p.device} "
                    f"and {q.dtype} on {q.device}"
                )
            key = (True, p.shape[0], q.shape[0], p.shape[1], p.dtype, p.device)
        else:
            raise TypeError(
                f"op {i}: expected a tensor (m, n) or a pair (P, Q), got {type(op).__name__}"
            )
        m, n = key[1], key[2]
        if rank > min(m, n):
            raise ValueError(
                f"op {i}: rank {rank} exceeds min(m, n) = {min(m, n)} of its shape ({m}, {n})"
            )
        group = groups.setdefault(key, OperatorGroup(*key))
        group.indices.append(i)
    return list(groups.values())


# Gram matrices are used as formed when their largest diagonal entry (squared column norm) lies in
# [2^-GRAM_EXPONENT, 2^GRAM_EXPONENT]; other operators are rescaled by a power of two (exact) first, so
# that nothing overflows or underflows for inputs anywhere in the dtype's range.
GRAM_EXPONENT = {torch.float32: 60, torch.float64: 600}
# Matrices per batched call are capped so that one chunk's operands stay in the last-level cache
# across all its passes (32 MiB L3 on the benchmark CPU).
CHUNK_BYTES = 32 * 2**20


def max_abs_checked(t: Tensor, indices: Sequence[int], what: str) -> Tensor:
    """max |t| per matrix, t: (b, r, c) -> (b, 1, 1); ValueError naming the first operator of the batch
    that holds a NaN or an Inf (both propagate through the max)."""
    # max(|max|, |min|): two reductions without the temporary that t.abs() would allocate.
    amax = torch.maximum(t.amax(dim=(-2, -1), keepdim=True), -t.amin(dim=(-2, -1), keepdim=True))
    bad = ~torch.isfinite(amax.flatten())
    if bool(bad.any()):
        op = indices[int(bad.nonzero()[0, 0])]
        raise ValueError(f"op {op}{what} contains NaN or Inf")
    return amax


def power_of_two_scale(amax: Tensor) -> Tensor:
    """A power of two near each max |entry| (1 for an all-zero matrix), same shape as amax."""
    _, exponent = torch.frexp(amax)
    scale = torch.ldexp(torch.ones_like(amax), exponent)
    return torch.where(amax > 0, scale, torch.ones_like(amax))


def checked_gram(
    x: Tensor, gram_of: Callable[[Tensor], Tensor], indices: Sequence[int], what: str
) -> tuple[Tensor, Tensor]:
    """The Gram matrices x^T x of a batch x (b, r, c), checked: (gram (b, c, c), scale (b, 1)).

    A NaN or Inf in x shows on the Gram diagonal; only then, or when the diagonal leaves the safe range,
    is x read again (max |x|) to raise a ValueError naming the operator or to rescale x IN PLACE by a
    power of two; scale holds that factor (1 elsewhere).
    """
    gram = gram_of(x)
    top = gram.diagonal(dim1=-2, dim2=-1).amax(-1)
    limit = 2.0 ** GRAM_EXPONENT[x.dtype]
    suspect = ~torch.isfinite(top) | (top > limit) | (top < 1.0 / limit)
    scale = torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device)
    if bool(suspect.any()):
        rows = suspect.nonzero()[:, 0]
        part = x[rows]
        factor = power_of_two_scale(max_abs_checked(part, [indices[int(i)] for i in rows], what))
        part = part / factor
        x[rows] = part
        gram[rows] = gram_of(part)
        scale[rows] = factor[:, :, 0]
    return gram, scale


def checked_dense(a: Tensor, indices: Sequence[int]) -> Tensor:
    """Check a batch a (b, m, n) for NaN/Inf (ValueError naming the operator) and rescale IN PLACE the
    matrices whose largest entry is outside [2^-e, 2^e], e = GRAM_EXPONENT / 2; returns scale (b, 1)."""
    amax = max_abs_checked(a, indices, "")
    limit = 2.0 ** (GRAM_EXPONENT[a.dtype] // 2)
    outside = ((amax > limit) | (amax < 1.0 / limit)) & (amax > 0)
    factor = torch.where(outside, power_of_two_scale(amax), torch.ones_like(amax))
    if bool(outside.any()):
        a.div_(factor)
    return factor[:, :, 0]


class Chunks:
    """Iterates a group's operators chunk by chunk, stacked into buffers that are reused across chunks
    (a fresh allocation per chunk would fault its pages in again).

    Yields (start, indices, first, second): first = A (b, m, n) and second None, or first = P (b, m, kr)
    and second = Q (b, n, kr); start is the chunk's offset in the group. The buffers are overwritten by
    the next chunk.
    """

    def __init__(self, ops: Sequence[Operator], group: OperatorGroup):
        self.ops, self.group = ops, group
        elements = (group.m + group.n) * group.kr if group.factored else group.m * group.n
        size = max(1, CHUNK_BYTES // (elements * torch.finfo(group.dtype).bits // 8))
        self.size = min(size, len(group.indices))

    def _stack(self, buf: Tensor, parts: list[Tensor]) -> Tensor:
        batch = buf[: len(parts)]
        torch.stack(parts, out=batch)
        return batch

    def __iter__(self):
        group, ops = self.group, self.ops
        shapes = (
            [(group.m, group.kr), (group.n, group.kr)] if group.factored else [(group.m, group.n)]
        )
        bufs = [
            torch.empty((self.size, *shape), dtype=group.dtype, device=group.device)
            for shape in shapes
        ]
        for start in range(0, len(group.indices), self.size):
            indices = group.indices[start : start + self.size]
            if group.factored:
                p = self._stack(bufs[0], [ops[i][0] for i in indices])
                q = self._stack(bufs[1], [ops[i][1] for i in indices])
                yield start, indices, p, q
            else:
                yield start, indices, self._stack(bufs[0], [ops[i] for i in indices]), None
