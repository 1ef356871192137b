"""Transformer pieces shared by the DINO encoder, the aggregator and the camera head.

Module and parameter names follow the official checkpoint (`norm1`, `attn.qkv`, `attn.q_norm`,
`attn.proj`, `ls1.gamma`, `norm2`, `mlp.fc1`, `mlp.fc2`, `ls2.gamma`). The four Linears are plain
`nn.Linear` so adapters can replace them by qualified name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (cos, sin) of shape (batch, 1, tokens, head_dim // 2) for the row half and the column half.
RopeTables = tuple[Tensor, Tensor, Tensor, Tensor]


class LayerScale(nn.Module):
    """x * gamma, gamma: (dim,)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2. x: (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def rope_tables(positions: Tensor, head_dim: int, base: float) -> RopeTables:
    """Cos/sin tables of the 2-D rotary embedding.

    positions: (batch, tokens, 2) integer (row, col) positions.
    Returns (cos_row, sin_row, cos_col, sin_col), each (batch, 1, tokens, head_dim // 2), fp32.
    Each half of a head is rotated "rotate-half" style: inv_freq_j = base^(-2j / half) for
    j < half / 2, and the angle table is duplicated to the full half width.
    """
    half = head_dim // 2
    exponents = torch.arange(0, half, 2, device=positions.device).float() / half
    inv_freq = 1.0 / (base**exponents)  # (half / 2,)
    tables = []
    for axis in (0, 1):
        angles = positions[..., axis].float()[..., None] * inv_freq  # (batch, tokens, half / 2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (batch, 1, tokens, half)
        tables += [angles.cos(), angles.sin()]
    return tables[0], tables[1], tables[2], tables[3]


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, tables: RopeTables) -> Tensor:
    """x: (batch, heads, tokens, head_dim); the first half of head_dim is rotated by the row
    position, the second by the column position. Returns the same shape."""
    cos_r, sin_r, cos_c, sin_c = (t.to(x.dtype) for t in tables)
    rows, cols = x.chunk(2, dim=-1)
    rows = rows * cos_r + _rotate_half(rows) * sin_r
    cols = cols * cos_c + _rotate_half(cols) * sin_c
    return torch.cat((rows, cols), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, optional qk-norm and 2-D RoPE.

    x: (batch, tokens, dim) -> (batch, tokens, dim).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, norm_eps: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # qk-norm: LayerNorm over each head's channels, applied before RoPE.
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: RopeTables | None = None) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (b, heads, n, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    x: (batch, tokens, dim) -> same shape. `rope` tables broadcast against (batch, heads, tokens).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, norm_eps=norm_eps)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: Tensor, rope: RopeTables | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


def init_transformer_weights(module: nn.Module) -> None:
    """ViT-style init for training from scratch: Linear weights ~ N(0, 0.02) truncated, zero
    biases. A checkpoint load overwrites all of it."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
