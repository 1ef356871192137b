"""The DINOv2-with-registers patch encoder that feeds the aggregator (`aggregator.patch_embed`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attrspace.models.vggt.layers import Block


class PatchEmbed(nn.Module):
    """Non-overlapping patches: (N, 3, H, W) -> (N, (H/p)*(W/p), dim), row-major patch order."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoEncoder(nn.Module):
    """ViT with a cls token, a learned absolute position embedding for an `img_size` grid
    (resized bicubically, with antialiasing, for other grids), registers inserted after cls, and
    pre-norm blocks with LayerNorm eps 1e-6, no qk-norm and no RoPE.

    forward: images (N, 3, H, W), already normalised -> patch tokens (N, (H/p)*(W/p), dim) after
    the final norm (cls and register outputs are dropped).
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        num_register_tokens: int,
        mlp_ratio: float = 4.0,
        init_values: float = 1.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, dim))
        # Present in the official state dict for masked pre-training; never used here.
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, init_values=init_values, norm_eps=1e-6)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)

    def position_embedding(self, rows: int, cols: int) -> Tensor:
        """(1, 1 + rows*cols, dim): the cls entry and the patch grid resized to rows x cols."""
        pos = self.pos_embed
        n = pos.shape[1] - 1
        grid = round(n**0.5)
        if rows == grid and cols == grid:
            return pos
        dim = pos.shape[-1]
        patch_pos = pos[:, 1:].float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos, size=(rows, cols), mode="bicubic", antialias=True, align_corners=False
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(pos.dtype)
        return torch.cat((pos[:, :1], patch_pos), dim=1)

    def forward(self, images: Tensor) -> Tensor:
        n, _, h, w = images.shape
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(n, -1, -1), x), dim=1)
        x = x + self.position_embedding(h // self.patch_size, w // self.patch_size)
        x = torch.cat((x[:, :1], self.register_tokens.expand(n, -1, -1), x[:, 1:]), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + self.num_register_tokens :]
