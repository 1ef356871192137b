"""attrspace.util.files: atomic writes keep the umask's mode; safetensors bytes do not depend on the process."""

import os
import subprocess
import sys

import torch

from attrspace.util.files import atomic_save_safetensors, atomic_write_bytes, read_safetensors

WRITE = """
import sys, torch
from attrspace.util.files import atomic_save_safetensors
tensors = {f"t{i}": torch.arange(i + 3, dtype=torch.float32) for i in range(6)}
metadata = {f"key{i}": str(i) for i in range(8)}
atomic_save_safetensors(tensors, metadata, sys.argv[1])
"""


def test_equal_contents_give_equal_bytes_in_every_process(tmp_path):
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for p in paths:
        subprocess.run([sys.executable, "-c", WRITE, str(p)], check=True)
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1] == data[2]
    tensors, metadata = read_safetensors(paths[0])
    assert metadata == {f"key{i}": str(i) for i in range(8)}
    assert torch.equal(tensors["t2"], torch.arange(5, dtype=torch.float32))


def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_save_safetensors({"t": torch.zeros(2)}, None, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    for name in ("a.bin", "b.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
