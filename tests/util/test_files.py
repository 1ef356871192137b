"""attrspace.util.files: atomic writes keep the umask's mode and name the target when the system
refuses them; safetensors bytes do not depend on the process; the reader refuses what is not a
regular file without blocking, and bounds size, JSON depth and encoding."""

import errno
import os
import subprocess
import sys
import threading

import pytest
import torch

from attrspace.util.files import (
    BadFileError,
    atomic_save_safetensors,
    atomic_write_bytes,
    read_bytes,
    read_json,
    read_safetensors,
    read_text,
)

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


# -- the one reader: regular files only, bounded in size and depth, never blocking ---------------


def _without_blocking(fn, fifo=None):
    """fn() run in a thread; a call still blocked after a minute fails the test (and is released by
    opening the FIFO's writing end) instead of hanging the suite."""
    result = {}

    def call():
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the test
            result["error"] = exc

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the reader blocked")
    if "error" in result:
        raise result["error"]
    return result.get("value")


@pytest.mark.parametrize("kind", ["fifo", "link to fifo", "link to /dev/zero", "folder"])
@pytest.mark.parametrize("reader", ["read_text", "read_json", "read_safetensors"])
def test_the_reader_says_what_a_non_regular_file_is_and_never_blocks(tmp_path, kind, reader):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    path = tmp_path / "config.json"
    if kind == "fifo":
        path = fifo
    elif kind == "link to fifo":
        path.symlink_to(fifo)
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    what = {"fifo": "FIFO", "link to fifo": "FIFO", "link to /dev/zero": "character device"}
    read = {"read_text": read_text, "read_json": read_json, "read_safetensors": read_safetensors}
    with pytest.raises(BadFileError, match=rf"{path}: .*{what.get(kind, 'folder')}"):
        _without_blocking(lambda: read[reader](path), fifo)


def test_the_reader_bounds_size_depth_and_encoding(tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(b" " * 101)
    with pytest.raises(BadFileError, match=rf"{path}: is 101 bytes, more than the 100"):
        read_bytes(path, limit=100)
    assert read_bytes(path, limit=101) == b" " * 101
    path.write_text("[" * 50_000 + "]" * 50_000)  # past the interpreter's recursion limit
    with pytest.raises(BadFileError, match=rf"{path}: JSON nested too deep"):
        read_json(path)
    path.write_text("[" * 150 + "]" * 150)  # parses, but deeper than any file of ours
    with pytest.raises(BadFileError, match=rf"{path}: JSON nested deeper than 100 levels"):
        read_json(path)
    path.write_text('{"a": ' * 99 + "1" + "}" * 99)
    assert read_json(path)["a"]["a"]["a"] is not None
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(BadFileError, match=rf"{path}: not UTF-8 text \(byte 0xff at offset 7\)"):
        read_text(path)


# -- a write the system refuses is an OSError naming the file -------------------------------------

FULL = """
import resource, signal, sys, torch
from attrspace.util.files import atomic_write_bytes
from attrspace.export.writers import write_merged_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
write = {
    "bytes": lambda p: atomic_write_bytes(p, bytes(10_000)),
    "safetensors": lambda p: write_merged_checkpoint({"w": torch.zeros(10_000)}, p),
}[sys.argv[2]]
try:
    write(sys.argv[1])
except BaseException as exc:
    print(type(exc).__name__, getattr(exc, "errno", None), getattr(exc, "filename", None))
"""


@pytest.mark.parametrize("writer", ["bytes", "safetensors"])
def test_a_write_past_the_file_size_limit_is_an_os_error_naming_the_target(tmp_path, writer):
    # A real refusal by the kernel (RLIMIT_FSIZE: EFBIG, the way ENOSPC is delivered). safetensors'
    # own writer turned it into a SafetensorError; a plain write named no file.
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    out = subprocess.run(
        [sys.executable, "-c", FULL, str(target), writer], capture_output=True, text=True
    )
    assert out.stdout.split() == ["OSError", str(errno.EFBIG), str(target)], out.stderr
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temporary file left


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask
