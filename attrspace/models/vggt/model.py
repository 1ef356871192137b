"""VGGT: aggregator + camera head + depth and point DPT heads, with the official state-dict layout.

The track head of the official model is not implemented; `load_checkpoint` skips its keys and
says so.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from attrspace.models.vggt.aggregator import Aggregator
from attrspace.models.vggt.camera_head import CameraHead
from attrspace.models.vggt.config import VGGTConfig
from attrspace.models.vggt.dpt_head import DPTHead


class VGGT(nn.Module):
    """forward(images) with images (S, 3, H, W) or (B, S, 3, H, W), RGB in [0, 1], H and W
    multiples of the patch size, returns a dict:

    - pose_enc (B, S, 9) and pose_enc_list (camera_iterations x (B, S, 9)): [t, q xyzw, fov_h,
      fov_w] of OpenCV camera-from-world extrinsics, in the frame of camera 0
    - depth (B, S, H, W, 1), depth_conf (B, S, H, W) > 1
    - world_points (B, S, H, W, 3), world_points_conf (B, S, H, W) > 1
    - images (B, S, 3, H, W), in eval mode only
    (keys of disabled heads are absent).
    """

    def __init__(self, config: VGGTConfig | None = None) -> None:
        super().__init__()
        config = VGGTConfig.vggt_1b() if config is None else config
        if not isinstance(config, VGGTConfig):
            raise TypeError(f"config must be a VGGTConfig, got {type(config).__name__}")
        self.config = config
        self.aggregator = Aggregator(config)
        # Registration order follows the official model (and so its state-dict order).
        self.camera_head = CameraHead(config) if config.enable_camera else None
        self.point_head = DPTHead(config, 4, "inv_log") if config.enable_point else None
        self.depth_head = DPTHead(config, 2, "exp") if config.enable_depth else None
        if self.camera_head is None and self.point_head is None and self.depth_head is None:
            raise ValueError("VGGTConfig enables no head")

    @property
    def head_layers(self) -> tuple[int, ...]:
        """The aggregator layers some head reads; the others are not kept during a forward."""
        layers = set()
        if self.camera_head is not None:
            layers.add(self.config.depth - 1)
        if self.point_head is not None or self.depth_head is not None:
            layers.update(self.config.dpt_layers)
        return tuple(sorted(layers))

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each aggregator block, the camera head and each frame chunk of the DPT
        heads in the backward pass (also in eval mode, whenever gradients are recorded)."""
        for module in (self.aggregator, self.camera_head, self.depth_head, self.point_head):
            if module is not None:
                module.gradient_checkpointing = bool(enabled)

    def _check_images(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim == 4:
            images = images[None]
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(
                f"images must have shape (S, 3, H, W) or (B, S, 3, H, W), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")
        p = self.config.patch_size
        h, w = images.shape[-2:]
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(
                f"image height and width must be positive multiples of {p}, got {h}x{w}"
            )
        return images

    def forward(self, images: Tensor) -> dict:
        images = self._check_images(images)
        h, w = images.shape[-2:]
        tokens = self.aggregator(images, keep_layers=self.head_layers)
        out: dict = {}
        # The heads run in full precision even under autocast, as the official model does (on the
        # meta device, used for exact memory accounting, there is no autocast to leave).
        device_type = images.device.type
        full_precision = (
            torch.autocast(device_type=device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )
        with full_precision:
            if self.camera_head is not None:
                poses = self.camera_head(tokens[-1])  # casts the camera tokens to its dtype
                out["pose_enc"] = poses[-1]
                out["pose_enc_list"] = poses
            for key, head in (("depth", self.depth_head), ("world_points", self.point_head)):
                if head is None:
                    continue
                values, conf = head(tokens, (h, w))  # casts each chunk to its dtype
                out[key] = values
                out[f"{key}_conf"] = conf
        if not self.training:
            out["images"] = images
        return out
