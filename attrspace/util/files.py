"""Files written atomically (`atomic_path`, the one writer) and safetensors read back with clear
errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor


def checksum(tensors: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    return tensors, metadata


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; a clean exit fsyncs it, gives it the
    mode an open() would (0666 less the umask: mkstemp's 0600 would keep the file from the user's
    group) and renames it over `path`, so a reader sees the old file or the whole new one. An
    exception removes the temporary file and leaves `path` as it was. The one way files are written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def canonical_header(data: bytes) -> bytes:
    """The same safetensors bytes with the header's keys sorted. safetensors writes metadata in
    hash-map order, which changes from process to process, so equal tensors written by two
    processes would differ in bytes (and in checksum) without this."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    if len(text) > size:  # cannot happen for the same keys and values; never corrupt a file
        return data
    return data[:8] + text.ljust(size, b" ") + data[8 + size :]


def atomic_save_safetensors(
    tensors: dict[str, Tensor], metadata: dict[str, str] | None, path: Path
) -> None:
    """Write tensors (and string metadata) as a safetensors file, atomically, with a canonical
    header (equal contents give equal bytes in every process)."""
    atomic_write_bytes(Path(path), canonical_header(save(tensors, metadata=metadata)))
