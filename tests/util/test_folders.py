"""attrspace.util.folders: a replaced folder is never missing for a reader, a link to a folder stays
a link, a folder that cannot be renamed (a mount point) is filled in place, two writers of one
folder both succeed in order, and folders get the mode the umask gives."""

import ctypes
import errno
import os
import subprocess
import sys
import threading

import pytest
import torch

import attrspace.util.folders as folders
from attrspace import inject_lora, load_peft, save_peft
from attrspace.models.vit import TinyViT
from attrspace.util.folders import staged_folder


def _write(folder, files: dict[str, str]) -> None:
    with staged_folder(folder) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def _tree(folder) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): p.read_text()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _strays(parent) -> list[str]:
    """Temporary or old folders left beside written folders (the lock files stay by design)."""
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".tmp", ".old")))


def _lora_model(seed: int):
    torch.manual_seed(seed)
    model = TinyViT(dim=16, depth=2, heads=2)
    inject_lora(model, targets=["attn.qkv", "mlp.fc1"], rank=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


EXPORTS = """
import sys, torch
from attrspace import inject_lora, save_peft
from attrspace.models.vit import TinyViT
models = []
for seed in (0, 1):
    torch.manual_seed(seed)
    model = TinyViT(dim=16, depth=2, heads=2)
    inject_lora(model, targets=["attn.qkv", "mlp.fc1"], rank=2, alpha=4)
    models.append(model)
print("ready", flush=True)
for i in range(int(sys.argv[2])):
    save_peft(models[i % 2], sys.argv[1])
"""


def test_a_reader_never_fails_while_another_process_re_exports(tmp_path):
    folder = tmp_path / "adapter"
    save_peft(_lora_model(0), folder)
    writer = subprocess.Popen(
        [sys.executable, "-c", EXPORTS, str(folder), "40"], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "ready"
    reads, failures = 0, []
    while writer.poll() is None and reads < 5000:
        try:
            assert len(load_peft(folder)) == 4
        except Exception as exc:  # every failure is collected and shown
            failures.append(repr(exc))
        reads += 1
    writer.wait()
    assert writer.returncode == 0 and reads > 0
    assert failures == []
    assert _strays(tmp_path) == []


def test_a_linked_destination_stays_a_link_and_gets_the_new_contents(tmp_path):
    (tmp_path / "v1").mkdir()
    latest = tmp_path / "latest"
    latest.symlink_to("v1")
    first, second = _lora_model(0), _lora_model(1)
    save_peft(first, latest)
    save_peft(second, latest)
    assert latest.is_symlink() and os.readlink(latest) == "v1"
    factors = load_peft(tmp_path / "v1")
    expected = second.blocks[0].attn.qkv.lora_B.weight
    assert torch.equal(factors["blocks.0.attn.qkv"].B, expected)
    assert _strays(tmp_path) == []


class _BusyRenames:
    """What the kernel answers for a mount point: it cannot be renamed or exchanged (EBUSY)."""

    def __init__(self, monkeypatch, mount):
        self.mount = os.fspath(mount)
        real = os.rename

        def rename(src, dst):
            if os.fspath(src) == self.mount or os.fspath(dst) == self.mount:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), self.mount)
            return real(src, dst)

        monkeypatch.setattr(folders.os, "rename", rename)
        monkeypatch.setattr(folders, "_libc", lambda: self)

    def renameat2(self, fd_a, a, fd_b, b, flags):
        ctypes.set_errno(errno.EBUSY)
        return -1


@pytest.mark.parametrize("before", ["empty", "older export"])
def test_a_mount_point_is_written_in_place(tmp_path, monkeypatch, before):
    mount = tmp_path / "mnt"
    mount.mkdir()
    if before == "older export":
        (mount / "sub").mkdir()
        (mount / "stale.txt").write_text("old")
        (mount / "a.txt").write_text("old")
        (mount / "sub" / "x.txt").write_text("old")
    inode = mount.stat().st_ino
    _BusyRenames(monkeypatch, mount)
    _write(mount, {"a.txt": "new", "b.txt": "new", "sub/y.txt": "new"})
    assert mount.stat().st_ino == inode  # the same folder, filled, not replaced
    assert _tree(mount) == {"a.txt": "new", "b.txt": "new", "sub/y.txt": "new"}
    assert _strays(tmp_path) == [] and not [p for p in mount.rglob(".*") if p.is_file()]


def test_a_mount_point_takes_a_peft_export(tmp_path, monkeypatch):
    mount = tmp_path / "mnt"
    mount.mkdir()
    _BusyRenames(monkeypatch, mount)
    model = _lora_model(0)
    save_peft(model, mount)
    save_peft(_lora_model(1), mount)
    assert set(load_peft(mount)) == {
        f"blocks.{i}.{n}" for i in (0, 1) for n in ("attn.qkv", "mlp.fc1")
    }


@pytest.mark.parametrize("exchange", ["renameat2", "two renames"])
def test_two_writers_of_one_folder_both_succeed_in_order(tmp_path, monkeypatch, exchange):
    if exchange == "two renames":  # a system without RENAME_EXCHANGE
        monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    folder = tmp_path / "out"
    errors, done = [], []

    def writer(tag):
        try:
            for i in range(40):
                _write(folder, {"a.txt": f"{tag}{i}", "b.txt": f"{tag}{i}"})
                done.append(tag)
        except Exception as exc:  # a lost export
            errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(done) == 80
    tree = _tree(folder)
    assert tree["a.txt"] == tree["b.txt"] and tree["a.txt"] in ("x39", "y39")
    assert _strays(tmp_path) == []


def test_a_writer_busy_past_the_wait_is_named(tmp_path):
    folder = tmp_path / "out"
    with staged_folder(folder):
        result = []
        thread = threading.Thread(target=lambda: result.append(_busy(folder)))
        thread.start()
        thread.join()
    assert str(folder) in result[0] and f"process {os.getpid()}" in result[0]


def _busy(folder) -> str:
    try:
        with staged_folder(folder, wait=0):
            return "entered"
    except folders.FolderBusyError as exc:
        return str(exc)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_folders_get_the_umasks_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        _write(tmp_path / "out", {"a.txt": "x", "sub/b.txt": "y"})
        save_peft(_lora_model(0), tmp_path / "adapter")
    finally:
        os.umask(old)
    for path in [tmp_path / "out", tmp_path / "out" / "sub", tmp_path / "adapter"]:
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path
    for path in [*(tmp_path / "out").rglob("*.txt"), *(tmp_path / "adapter").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
