"""A small ViT-like model built from VGGT's own blocks: the model of the demo, the tests and the layer
benchmarks (tokens in, tokens out), small enough for a CPU step in milliseconds."""

from __future__ import annotations

from torch import Tensor, nn

from attrspace.models.vggt.layers import Block

# The block linears an adapter replaces, by their names inside each block (VGGT's names).
ADAPTED = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class TinyViT(nn.Module):
    """Patch embedding + `depth` pre-norm transformer blocks + a linear head; tokens in, tokens out.

    The blocks' LayerScale starts at 1 (not VGGT's 0.01): this model is trained from scratch for a
    few steps, where a 0.01 residual branch would leave the blocks, and their adapters, inert."""

    def __init__(
        self, dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: int = 4, in_dim: int = 48
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=mlp_ratio, init_values=1.0) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, in_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
