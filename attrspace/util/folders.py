"""Folders that one process owns while it writes them, and folders replaced in one rename.

`folder_lock` keeps two processes out of one run or render folder. It takes an exclusive flock
(the `filelock` library) on a lock file and writes the holder's pid, host and command into a side
file for the message a second process gets. The kernel drops a flock when its process dies, however
it dies (SIGKILL included), so the lock of a dead process is simply taken over; the side file it
left is overwritten.

`staged_folder` gives a fresh temporary folder beside a target; a clean exit replaces the target
with it by renames, so readers see the old contents or the whole new set, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from attrspace.util.files import atomic_write_bytes

LOCK_SUFFIX = ".lock"
OWNER_SUFFIX = ".lock.owner"
_TEMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"


class FolderBusyError(RuntimeError):
    """Another live process holds the lock of a folder."""


def _holder(owner_file: Path) -> str:
    try:
        info = json.loads(owner_file.read_text())
        return (
            f"process {int(info['pid'])} on host {info['host']} (since {info['since']}: "
            f"{info['command']})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its owner file is missing or unreadable)"


@contextlib.contextmanager
def folder_lock(folder: Path, lock_file: Path) -> Iterator[None]:
    """Hold the exclusive lock `lock_file` for `folder` inside the block.

    Raises FolderBusyError naming the folder and the holder (pid, host, command) when another live
    process holds it; never waits. Lock files stay in place (waiters must share one inode); the
    owner side file is removed on release."""
    folder, lock_file = Path(folder), Path(lock_file)
    owner_file = lock_file.with_name(lock_file.name.removesuffix(LOCK_SUFFIX) + OWNER_SUFFIX)
    # fallback_to_soft=False: a soft lock (a marker file) outlives a killed holder, a flock does not.
    lock = FileLock(lock_file, timeout=0, fallback_to_soft=False, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise FolderBusyError(
            f"{folder} is in use by {_holder(owner_file)}; wait for it to finish or stop it"
        ) from None
    except OSError as exc:  # the lock file cannot be created: name the folder it is for
        raise OSError(exc.errno, f"cannot lock {folder} ({exc.strerror})", str(lock_file)) from exc
    try:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        atomic_write_bytes(owner_file, json.dumps(owner).encode())
        try:
            yield
        finally:
            owner_file.unlink(missing_ok=True)
    finally:
        lock.release()


def lock_beside(folder: Path) -> Path:
    """The lock file of a folder that is itself replaced by renames: `.NAME.lock` in its parent
    (a lock file inside would move away with the old folder)."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


def _sibling(folder: Path, suffix: str) -> Path:
    return folder.parent / f".{folder.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def remove_leftovers(folder: Path) -> None:
    """Remove temporary and old siblings of `folder` left by writers that are gone (their pid is in
    the name; a live process's are kept)."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return
    for path in folder.parent.glob(f".{folder.name}.*"):
        if path.is_dir() and path.name.endswith((_TEMP_SUFFIX, _OLD_SUFFIX)):
            pid = path.name.removeprefix(f".{folder.name}.").split("-", 1)[0]
            if not pid.isdigit() or not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier write in this process that was interrupted
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE): a reader opening files
    under either name sees the old folder or the new one, never neither. False where the kernel, the
    C library or the file system cannot do it (the caller then renames twice)."""
    rename_exchange = 2
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def resolve_destination(folder: Path) -> Path:
    """The folder a write to `folder` replaces: a symbolic link (`latest -> v1`) is followed, so the
    link stays a link and its target gets the new contents; anything but a folder is refused."""
    folder = Path(folder)
    if folder.is_symlink():
        folder = folder.resolve()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    return folder


def replace_folder(new: Path, folder: Path) -> None:
    """Put folder `new` in the place of `folder` (which may be absent; a link to a folder is
    followed). Where the system can, the two are exchanged in one step and the old contents deleted
    afterwards, so a reader never finds `folder` missing; elsewhere the old one is renamed aside and
    put back if the second rename fails. Leftovers of a kill are hidden siblings that
    remove_leftovers deletes."""
    new, folder = Path(new), resolve_destination(folder)
    if not folder.exists():
        os.rename(new, folder)
    elif _exchange(new, folder):
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old contents
    else:
        old = _sibling(folder, _OLD_SUFFIX)
        os.rename(folder, old)
        try:
            os.rename(new, folder)
        except BaseException:
            os.rename(old, folder)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(folder.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or folder by path (a folder's entry list is durable only once it is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """A new empty folder beside `folder` to write into; a clean exit replaces `folder` with it
    (replace_folder), an exception deletes it and leaves `folder` as it was."""
    folder = resolve_destination(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)
    tmp = _sibling(folder, _TEMP_SUFFIX)
    os.mkdir(tmp)  # not mkdtemp: its 0700 mode would become the folder's mode
    try:
        yield tmp
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
