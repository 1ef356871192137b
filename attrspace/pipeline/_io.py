"""Model weights of a stage, written atomically with the digest of the run that produced them."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save
from torch import nn

from attrspace._io import atomic_write_bytes

from .workspace import DIGEST_KEY


def save_weights(model: nn.Module, path: Path, stage_digest: str) -> None:
    """The model's state dict (official VGGT layout) as safetensors, tagged with `stage_digest`
    so that a loader can tell weights of another configuration apart."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata={DIGEST_KEY: stage_digest, "format": "pt"})
    atomic_write_bytes(Path(path), canonical_header(data))


def canonical_header(data: bytes) -> bytes:
    """The same safetensors bytes with the header's keys sorted. safetensors writes metadata in
    hash-map order, which changes from process to process, so equal weights written by two
    processes would differ in bytes (and in checksum) without this."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    if len(text) > size:  # cannot happen for the same keys and values; never corrupt a file
        return data
    return data[:8] + text.ljust(size, b" ") + data[8 + size :]
