"""Model weights of a stage, written atomically with the digest of the run that produced them."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save
from torch import nn

from attrspace.pipeline.workspace import DIGEST_KEY
from attrspace.util.files import atomic_write_bytes, canonical_header


def save_weights(model: nn.Module, path: Path, stage_digest: str) -> None:
    """The model's state dict (official VGGT layout) as safetensors, tagged with `stage_digest`
    so that a loader can tell weights of another configuration apart."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata={DIGEST_KEY: stage_digest, "format": "pt"})
    atomic_write_bytes(Path(path), canonical_header(data))
