"""A VGGT-compatible model (official module names and state-dict layout) with tiny configurations."""

from .checkpoint import LoadReport, load_checkpoint, load_pretrained
from .config import VGGTConfig
from .model import VGGT
from .params import adaptation_targets

__all__ = [
    "VGGT",
    "LoadReport",
    "VGGTConfig",
    "adaptation_targets",
    "load_checkpoint",
    "load_pretrained",
]
