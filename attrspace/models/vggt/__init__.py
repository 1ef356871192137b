"""A VGGT-compatible model (official module names and state-dict layout) with tiny configurations."""

from attrspace.models.vggt.checkpoint import LoadReport, load_checkpoint, load_pretrained
from attrspace.models.vggt.config import VGGTConfig
from attrspace.models.vggt.model import VGGT
from attrspace.models.vggt.params import adaptation_targets

__all__ = [
    "VGGT",
    "LoadReport",
    "VGGTConfig",
    "adaptation_targets",
    "load_checkpoint",
    "load_pretrained",
]
