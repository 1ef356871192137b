"""The DPT dense head (depth head and point head): four aggregator layers -> a full-resolution map
with a confidence channel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attrspace.models.vggt.config import VGGTConfig


def uv_embedding(channels: int, rows: int, cols: int, aspect: float, like: Tensor) -> Tensor:
    """(channels, rows, cols) sin/cos embedding of a centred UV grid.

    The grid spans +-aspect/diag horizontally and +-1/diag vertically (diag = sqrt(aspect^2 + 1),
    pixel centres: the ends are pulled in by (n - 1) / n). The first half of the channels embeds u,
    the second half v; each half is [sin, cos] at frequencies 100^(-k / (channels / 4)).
    """
    diag = (aspect**2 + 1.0) ** 0.5
    span_u, span_v = aspect / diag, 1.0 / diag
    u = torch.linspace(-span_u * (cols - 1) / cols, span_u * (cols - 1) / cols, cols)
    v = torch.linspace(-span_v * (rows - 1) / rows, span_v * (rows - 1) / rows, rows)
    uu, vv = torch.meshgrid(u.to(like.device), v.to(like.device), indexing="xy")  # (rows, cols)
    quarter = channels // 4
    omega = torch.arange(quarter, dtype=torch.float64, device=like.device) / quarter
    omega = 1.0 / 100.0**omega
    parts = []
    for coord in (uu, vv):
        angles = coord.reshape(-1, 1).double() * omega  # (rows*cols, quarter)
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=-1).float().reshape(rows, cols, 4 * quarter)
    return emb.permute(2, 0, 1).to(like.dtype)


class ResidualConvUnit(nn.Module):
    """relu -> conv1 -> relu -> conv2, plus a skip. x: (N, F, h, w) -> same shape.

    The official head applies its ReLU in place to the unit's input, so the skip carries relu(x),
    not x; reproduced here (without the in-place op) so checkpoint outputs match."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FusionBlock(nn.Module):
    """RefineNet-style fusion: (previous path [+ unit1(skip)]) -> unit2 -> bilinear resize
    (align_corners) to `size` or x2 -> 1x1 out_conv."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size=None) -> Tensor:
        if self.has_residual:
            if skip is None:
                raise ValueError("this fusion block needs a skip input")
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """tokens of the aggregator layers `config.dpt_layers` (B, S, P, 2C) -> (map, conf):
    map (B, S, H, W, output_dim - 1) through `activation`, conf (B, S, H, W) = 1 + exp(.).

    activation: "exp" (depth) or "inv_log" (points: sign(x) (exp|x| - 1)).
    """

    def __init__(self, config: VGGTConfig, output_dim: int, activation: str) -> None:
        super().__init__()
        if activation not in ("exp", "inv_log"):
            raise ValueError(f"activation must be 'exp' or 'inv_log', got {activation!r}")
        dim_in = 2 * config.embed_dim
        oc = config.dpt_out_channels
        feats = config.dpt_features
        self.patch_size = config.patch_size
        self.layers = tuple(config.dpt_layers)
        self.patch_start_idx = config.patch_start_idx
        self.frames_chunk = config.dpt_frames_chunk
        self.gradient_checkpointing = config.gradient_checkpointing
        self.activation = activation
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, c, 1) for c in oc)
        # Scales x4, x2, x1, x1/2 of the patch grid. Index 2 has no parameters.
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i in range(4):
            conv = nn.Conv2d(oc[i], feats, 3, padding=1, bias=False)
            setattr(self.scratch, f"layer{i + 1}_rn", conv)
        self.scratch.refinenet1 = FusionBlock(feats)
        self.scratch.refinenet2 = FusionBlock(feats)
        self.scratch.refinenet3 = FusionBlock(feats)
        self.scratch.refinenet4 = FusionBlock(feats, has_residual=False)
        self.scratch.output_conv1 = nn.Conv2d(feats, feats // 2, 3, padding=1)
        # Indices 0 and 2 carry the keys (1 is the ReLU).
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(feats // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, output_dim, 1)
        )

    def _with_uv(self, x: Tensor, aspect: float) -> Tensor:
        emb = uv_embedding(x.shape[1], x.shape[-2], x.shape[-1], aspect, x)
        return x + 0.1 * emb

    def _fuse(self, maps: list[Tensor]) -> Tensor:
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i + 1}_rn")(m) for i, m in enumerate(maps))
        out = s.refinenet4(l4, size=l3.shape[-2:])
        out = s.refinenet3(out, l3, size=l2.shape[-2:])
        out = s.refinenet2(out, l2, size=l1.shape[-2:])
        out = s.refinenet1(out, l1)
        return s.output_conv1(out)

    def _forward_frames(self, h: int, w: int, *layers: Tensor) -> tuple[Tensor, Tensor]:
        """layers: 4 x (B, s, P, 2C) for a chunk of s frames, in any float dtype (cast to the
        head's here, so a checkpoint keeps the aggregator's tensors, not full-precision copies)
        -> (B, s, H, W, D - 1), (B, s, H, W)."""
        b, s = layers[0].shape[:2]
        rows, cols = h // self.patch_size, w // self.patch_size
        dtype = self.norm.weight.dtype
        maps = []
        for i, tokens in enumerate(layers):
            patches = tokens[:, :, self.patch_start_idx :].to(dtype)
            x = self.norm(patches.reshape(b * s, rows * cols, -1))
            x = x.transpose(1, 2).reshape(b * s, -1, rows, cols)
            x = self._with_uv(self.projects[i](x), w / h)
            maps.append(self.resize_layers[i](x))
        out = self._fuse(maps)
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        out = self.scratch.output_conv2(self._with_uv(out, w / h))  # (B*s, D, H, W)
        out = out.permute(0, 2, 3, 1).reshape(b, s, h, w, -1)
        values, conf = out[..., :-1], out[..., -1]
        if self.activation == "exp":
            values = torch.exp(values)
        else:
            values = torch.sign(values) * torch.expm1(values.abs())
        return values, 1 + torch.exp(conf)

    def forward(self, tokens: list, image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """tokens: the aggregator's per-layer list; image_hw: (H, W) of the input images.
        Frames go through in chunks of `dpt_frames_chunk` to bound activation memory. With
        `gradient_checkpointing` (while gradients are recorded) each chunk is recomputed in the
        backward pass: a training step keeps only the chunk's input tokens, and the backward holds
        one chunk's activations at a time (same outputs and gradients)."""
        h, w = image_hw
        layers = [tokens[i] for i in self.layers]
        if any(t is None for t in layers):
            raise ValueError(f"the DPT head needs aggregator layers {self.layers}")
        s = layers[0].shape[1]
        values, confs = [], []
        for start in range(0, s, self.frames_chunk):
            chunk = [t[:, start : start + self.frames_chunk] for t in layers]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                v, c = checkpoint(self._forward_frames, h, w, *chunk, use_reentrant=False)
            else:
                v, c = self._forward_frames(h, w, *chunk)
            values.append(v)
            confs.append(c)
        return torch.cat(values, dim=1), torch.cat(confs, dim=1)
