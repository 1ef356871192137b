"""The camera head: iterative refinement of a 9-D pose encoding from the camera tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attrspace.models.vggt.config import VGGTConfig
from attrspace.models.vggt.layers import Block, Mlp, init_transformer_weights

POSE_DIM = 9  # [t (3), quaternion xyzw (4), fov_h, fov_w]


def activate_pose(raw: Tensor) -> Tensor:
    """(..., 9) raw encoding -> translation and quaternion unchanged, FoV through ReLU."""
    return torch.cat((raw[..., :7], F.relu(raw[..., 7:])), dim=-1)


class CameraHead(nn.Module):
    """tokens of the last aggregator layer (B, S, P, 2C) -> list of `iterations` pose encodings
    (B, S, 9), each the running estimate after one refinement step.

    Each step embeds the previous (detached) estimate, or a learned empty pose at step 0, turns it
    into an adaLN shift / scale / gate for the camera tokens, runs a small transformer trunk across
    the S camera tokens of each scene and adds the predicted delta to the estimate.
    """

    def __init__(self, config: VGGTConfig) -> None:
        super().__init__()
        dim = 2 * config.embed_dim
        self.iterations = config.camera_iterations
        self.gradient_checkpointing = config.gradient_checkpointing
        self.trunk = nn.Sequential(
            *(
                Block(dim, config.camera_num_heads, mlp_ratio=config.mlp_ratio, init_values=0.01)
                for _ in range(config.camera_trunk_depth)
            )
        )
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_DIM))
        self.embed_pose = nn.Linear(POSE_DIM, dim)
        # Index 0 is the SiLU, so the Linear's keys are `poseLN_modulation.1.*`.
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.adaln_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim, dim // 2, POSE_DIM)
        init_transformer_weights(self)

    def forward(self, last_layer_tokens: Tensor, iterations: int | None = None) -> list[Tensor]:
        """last_layer_tokens (B, S, P, 2C) in any float dtype (only the camera tokens are cast to
        the head's dtype). With `gradient_checkpointing` (while gradients are recorded) the
        refinement is recomputed in the backward pass and a training step keeps only the
        (B, S, 2C) camera tokens (same outputs and gradients)."""
        iterations = self.iterations if iterations is None else iterations
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        camera_tokens = last_layer_tokens[:, :, 0].to(self.token_norm.weight.dtype)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return list(checkpoint(self._refine, camera_tokens, iterations, use_reentrant=False))
        return self._refine(camera_tokens, iterations)

    def _refine(self, camera_tokens: Tensor, iterations: int) -> list[Tensor]:
        tokens = self.token_norm(camera_tokens)  # (B, S, 2C)
        b, s, _ = tokens.shape
        raw = None
        outputs = []
        for _ in range(iterations):
            if raw is None:
                condition = self.embed_pose(self.empty_pose_tokens.expand(b, s, -1))
            else:
                raw = raw.detach()  # no backpropagation through the refinement chain
                condition = self.embed_pose(raw)
            shift, scale, gate = self.poseLN_modulation(condition).chunk(3, dim=-1)
            x = gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            raw = delta if raw is None else raw + delta
            outputs.append(activate_pose(raw))
        return outputs
