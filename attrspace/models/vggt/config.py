"""Sizes and switches of a VGGT-compatible model.

`VGGTConfig.vggt_1b()` gives the official VGGT-1B sizes (its state dict matches the released
checkpoint); `tiny()` and `small()` keep the same module structure and key names at sizes that train
on a CPU in milliseconds (tests) or seconds (demos).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from attrspace.util.files import atomic_write_bytes, read_json

CONFIG_FILE = "config.json"
# Keys of the official constructor's config.json that this package has no field for: the track
# head is not built here, so its switch is accepted and ignored.
_IGNORED_OFFICIAL_KEYS = ("enable_track",)


@dataclass(frozen=True)
class VGGTConfig:
    """Every size of the model. Names of the official constructor arguments where one exists.

    The DINO width equals the aggregator width (`embed_dim`) because patch tokens enter the
    aggregator without a projection. Heads read the concatenation of a frame and a global block's
    output, so they work at width `2 * embed_dim`.
    """

    # Images and patch encoder (DINOv2 with registers).
    img_size: int = 518  # the grid of the learned position embedding: (img_size / patch)^2 + 1
    patch_size: int = 14
    embed_dim: int = 1024
    num_register_tokens: int = 4
    dino_depth: int = 24
    dino_num_heads: int = 16
    dino_init_values: float = 1.0  # LayerScale init in DINO blocks (learned values are loaded)

    # Aggregator: `depth` frame blocks alternating with `depth` global blocks.
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    init_values: float = 0.01
    rope_freq: float = 100.0

    # Camera head.
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    camera_iterations: int = 4

    # Depth and point DPT heads.
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_layers: tuple[int, int, int, int] = (4, 11, 17, 23)
    dpt_frames_chunk: int = 8

    # Which heads exist. The paper fine-tunes with camera + depth only (no point head).
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True

    # Recompute each aggregator block, the camera head and each frame chunk of the DPT heads in
    # the backward pass instead of storing their activations (same outputs and gradients).
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        positive = {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "dino_depth": self.dino_depth,
            "dino_num_heads": self.dino_num_heads,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "camera_trunk_depth": self.camera_trunk_depth,
            "camera_num_heads": self.camera_num_heads,
            "camera_iterations": self.camera_iterations,
            "dpt_features": self.dpt_features,
            "dpt_frames_chunk": self.dpt_frames_chunk,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VGGTConfig.{name} must be a positive int, got {value!r}")
        if self.num_register_tokens < 0:
            raise ValueError(
                f"VGGTConfig.num_register_tokens must be >= 0, got {self.num_register_tokens}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}"
            )
        for name, heads in (("num_heads", self.num_heads), ("dino_num_heads", self.dino_num_heads)):
            if self.embed_dim % heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible by {name} {heads}")
        # 2-D RoPE rotates two halves of every head, each by pairs of channels.
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"aggregator head dim {self.embed_dim // self.num_heads} must be divisible by 4 "
                "(2-D RoPE splits it into two rotated halves)"
            )
        if (2 * self.embed_dim) % self.camera_num_heads:
            raise ValueError(
                f"camera head width {2 * self.embed_dim} is not divisible by camera_num_heads "
                f"{self.camera_num_heads}"
            )
        if len(self.dpt_out_channels) != 4 or len(self.dpt_layers) != 4:
            raise ValueError("dpt_out_channels and dpt_layers must have exactly 4 entries each")
        if any(c <= 0 for c in self.dpt_out_channels):
            raise ValueError(f"dpt_out_channels must be positive, got {self.dpt_out_channels}")
        bad = [i for i in self.dpt_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"dpt_layers {self.dpt_layers} out of range for depth {self.depth}")
        # The DPT head adds a sin/cos UV embedding in four equal parts to every projected map and
        # to output_conv1's output (dpt_features / 2 channels).
        if any(c % 4 for c in self.dpt_out_channels) or self.dpt_features % 8:
            raise ValueError(
                f"dpt_out_channels {self.dpt_out_channels} must be multiples of 4 and "
                f"dpt_features {self.dpt_features} a multiple of 8"
            )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token in an aggregator frame: camera token + registers."""
        return 1 + self.num_register_tokens

    def to_dict(self) -> dict:
        """Every field as JSON-ready values (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> VGGTConfig:
        """The inverse of to_dict; also reads the official config.json (img_size, patch_size,
        embed_dim, enable_*: the other sizes keep their VGGT-1B values). Unknown keys and values
        of the wrong type are refused in one line naming `where`, the key and the valid keys."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(values).__name__}")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(defaults) - set(_IGNORED_OFFICIAL_KEYS))
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {unknown}; valid keys: {', '.join(sorted(defaults))}"
            )
        changes = {}
        for key, value in values.items():
            if key in _IGNORED_OFFICIAL_KEYS:
                continue
            changes[key] = _typed(where, key, value, defaults[key])
        try:
            return cls(**changes)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err

    def save(self, path: str | Path) -> None:
        """Write the config as JSON (the config.json beside a model.safetensors)."""
        text = json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"
        atomic_write_bytes(Path(path), text.encode())

    @classmethod
    def load(cls, path: str | Path) -> VGGTConfig:
        """Read a config.json written by save (or the official one, see from_dict)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        try:
            values = read_json(path)  # the bounded reader (BadFileError: a ValueError)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{path}: no model config (config.json) found") from err
        return cls.from_dict(values, where=str(path))

    def replace(self, **changes) -> VGGTConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def vggt_1b(cls, **changes) -> VGGTConfig:
        """The official VGGT-1B sizes (all defaults)."""
        return cls(**changes)

    @classmethod
    def tiny(cls, **changes) -> VGGTConfig:
        """Same structure at width 64 and depth 2: a forward + backward of a few 28-56 px frames
        takes milliseconds on a CPU. Test images: 28x28, 42x42 or 42x56."""
        base = dict(
            img_size=56,
            embed_dim=64,
            dino_depth=2,
            dino_num_heads=4,
            depth=2,
            num_heads=4,
            camera_trunk_depth=1,
            camera_num_heads=4,
            camera_iterations=4,
            dpt_features=16,
            dpt_out_channels=(16, 32, 64, 64),
            dpt_layers=(0, 1, 1, 1),
        )
        base.update(changes)
        return cls(**base)

    @classmethod
    def small(cls, **changes) -> VGGTConfig:
        """Width 128, depth 4: for CPU demos at 56-112 px (a few M parameters)."""
        base = dict(
            img_size=112,
            embed_dim=128,
            dino_depth=2,
            dino_num_heads=4,
            depth=4,
            num_heads=4,
            camera_trunk_depth=2,
            camera_num_heads=4,
            camera_iterations=4,
            dpt_features=32,
            dpt_out_channels=(32, 64, 128, 128),
            dpt_layers=(0, 1, 2, 3),
        )
        base.update(changes)
        return cls(**base)


def _typed(where: str, key: str, value, default):
    """`value` checked against the type of the field's default (tuples given as lists)."""
    if isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        if ok:
            return tuple(value)
        want = "a list of ints"
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
        want = "true or false"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        want = "an int"
    else:  # float
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        want = "a number"
    raise ValueError(f"{where}: {key} must be {want}, got {value!r}")
