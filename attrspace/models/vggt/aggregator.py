"""The alternating-attention aggregator: frame blocks (attention inside each frame) interleaved with
global blocks (attention over all tokens of all frames of a scene)."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attrspace.models.vggt.config import VGGTConfig
from attrspace.models.vggt.dinov2 import DinoEncoder
from attrspace.models.vggt.layers import Block, RopeTables, init_transformer_weights, rope_tables

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _first_and_rest(token: Tensor, batch: int, frames: int) -> Tensor:
    """token: (1, 2, X, C) -> (batch * frames, X, C). Slot 0 goes to frame 0 of every scene, slot 1
    to all other frames: this is how the network knows which frame defines the world frame."""
    first = token[:, :1].expand(batch, 1, *token.shape[2:])
    rest = token[:, 1:].expand(batch, frames - 1, *token.shape[2:])
    return torch.cat((first, rest), dim=1).reshape(batch * frames, *token.shape[2:])


class Aggregator(nn.Module):
    """images (B, S, 3, H, W) in [0, 1] -> per-layer tokens (B, S, P, 2C) where P = 5 + (H/p)(W/p)
    holds [camera, 4 registers, patches] and the channels are [frame block out, global block out].
    """

    def __init__(self, config: VGGTConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.patch_embed = DinoEncoder(
            img_size=c.img_size,
            patch_size=c.patch_size,
            dim=c.embed_dim,
            depth=c.dino_depth,
            num_heads=c.dino_num_heads,
            num_register_tokens=c.num_register_tokens,
            mlp_ratio=c.mlp_ratio,
            init_values=c.dino_init_values,
        )

        def make_block() -> Block:
            return Block(
                c.embed_dim,
                c.num_heads,
                mlp_ratio=c.mlp_ratio,
                init_values=c.init_values,
                qk_norm=True,
                norm_eps=1e-5,
            )

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(c.depth))
        self.global_blocks = nn.ModuleList(make_block() for _ in range(c.depth))
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, c.embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, c.num_register_tokens, c.embed_dim))
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)
        init_transformer_weights(self)
        self.gradient_checkpointing = c.gradient_checkpointing
        # Not in the checkpoint (non-persistent), rebuilt by reset_constant_buffers().
        self.register_buffer("_resnet_mean", torch.empty(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.empty(1, 1, 3, 1, 1), persistent=False)
        self.reset_constant_buffers()

    def reset_constant_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the ImageNet normalisation buffers, e.g. after a model built on the meta
        device received its weights."""
        device = self._resnet_mean.device if device is None else torch.device(device)
        self._resnet_mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
        self._resnet_std = torch.tensor(_IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)

    def _run(self, block: Block, x: Tensor, rope: RopeTables) -> Tensor:
        # Checkpoint whenever gradients flow, also in eval mode: a frozen aggregator that carries
        # trainable adapters needs it most. Non-reentrant so that gradients reach the adapters
        # even though the block input itself does not require grad.
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, rope, use_reentrant=False)
        return block(x, rope)

    def forward(self, images: Tensor, keep_layers: Collection[int] | None = None) -> list:
        """images (B, S, 3, H, W) -> list of `depth` entries, each (B, S, P, 2C) or None.

        keep_layers: the layer indices to return (the rest are None, so their memory is freed as
        soon as the next block has run); None keeps all.
        """
        b, s, _, h, w = images.shape
        c = self.config
        rows, cols = h // c.patch_size, w // c.patch_size
        mean = self._resnet_mean.to(images.dtype)
        std = self._resnet_std.to(images.dtype)
        x = ((images - mean) / std).reshape(b * s, 3, h, w)
        patches = self.patch_embed(x)  # (B*S, K, C)
        special = [
            _first_and_rest(self.camera_token, b, s),
            _first_and_rest(self.register_token, b, s),
        ]
        tokens = torch.cat([t.to(patches.dtype) for t in special] + [patches], dim=1)
        p, dim = tokens.shape[1], tokens.shape[2]

        # Patch (row, col) positions start at 1; the special tokens sit at (0, 0).
        grid = torch.cartesian_prod(
            torch.arange(rows, device=images.device), torch.arange(cols, device=images.device)
        )
        special_pos = torch.zeros(c.patch_start_idx, 2, device=images.device)
        pos = torch.cat((special_pos, grid.float() + 1))
        frame_rope = rope_tables(pos[None], c.head_dim, c.rope_freq)  # (1, 1, P, half)
        global_rope = tuple(t.repeat(1, 1, s, 1) for t in frame_rope)  # (1, 1, S*P, half)

        keep = set(range(c.depth)) if keep_layers is None else set(keep_layers)
        outputs: list = []
        for i in range(c.depth):
            tokens = self._run(self.frame_blocks[i], tokens.reshape(b * s, p, dim), frame_rope)
            frame_out = tokens.reshape(b, s, p, dim)
            tokens = self._run(self.global_blocks[i], tokens.reshape(b, s * p, dim), global_rope)
            if i in keep:
                outputs.append(torch.cat((frame_out, tokens.reshape(b, s, p, dim)), dim=-1))
            else:
                outputs.append(None)
        return outputs
