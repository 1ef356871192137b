"""Folders that one process owns while it writes them, and folders replaced in one rename.

`folder_lock` keeps two processes out of one run or render folder. It takes an exclusive flock
(the `filelock` library) on a lock file and writes the holder's pid, host and command into a side
file for the message a second process gets. The kernel drops a flock when its process dies, however
it dies (SIGKILL included), so the lock of a dead process is simply taken over; the side file it
left is overwritten.

`staged_folder` gives a fresh temporary folder beside a target; a clean exit replaces the target
with it by renames, so readers see the old contents or the whole new set, never a mix. It holds the
target's lock (`lock_beside`) meanwhile: a second writer of the same folder waits for the first and
then replaces its result, in order. A target that cannot be renamed (a mount point: EBUSY, EXDEV)
is filled in place instead, file by file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from attrspace.util.files import BadFileError, atomic_path, atomic_write_bytes, os_error, read_json

LOCK_SUFFIX = ".lock"
OWNER_SUFFIX = ".lock.owner"
_TEMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"
# How long a writer waits for another writer of the same folder (an export takes seconds).
WRITER_WAIT_S = 600.0
# errno of a rename that cannot move this folder, though the folder can be written: a mount point.
_IMMOVABLE = (errno.EBUSY, errno.EXDEV)
# errno of a renameat2 that this kernel, C library or file system does not offer.
_NO_EXCHANGE = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


# Locks held by this process, by (folder of the lock file, its name, thread): another thread's
# attempt conflicts through the flock as another process's would.
_HELD: set[tuple[str, str, int]] = set()


# Temporary folders that staged_folder is filling: only their writer can see them, so folders
# written inside them need no lock (and would leave lock files named after a temporary folder).
_PRIVATE: set[Path] = set()


class FolderBusyError(RuntimeError):
    """Another live process holds the lock of a folder."""


def _holder(owner_file: Path) -> str:
    try:
        info = read_json(owner_file, limit=1 << 16)
        return (
            f"process {int(info['pid'])} on host {info['host']} (since {info['since']}: "
            f"{info['command']})"
        )
    except (OSError, BadFileError, ValueError, KeyError, TypeError):
        return "another process (its owner file is missing or unreadable)"


@contextlib.contextmanager
def folder_lock(folder: Path, lock_file: Path, wait: float = 0.0) -> Iterator[None]:
    """Hold the exclusive lock `lock_file` for `folder` inside the block.

    Raises FolderBusyError naming the folder and the holder (pid, host, command) when another live
    process (or thread) still holds it after `wait` seconds (0: never waits). Lock files stay in
    place (waiters must share one inode); the owner side file is removed on release."""
    folder, lock_file = Path(folder), Path(lock_file)
    key = (os.path.realpath(lock_file.parent), lock_file.name, threading.get_ident())
    if key in _HELD:  # this thread holds it already (render command -> staged_folder): reentrant
        yield
        return
    owner_file = lock_file.with_name(lock_file.name.removesuffix(LOCK_SUFFIX) + OWNER_SUFFIX)
    # fallback_to_soft=False: a soft lock (a marker file) outlives a killed holder, a flock does not.
    lock = FileLock(lock_file, timeout=wait, fallback_to_soft=False, thread_local=False)
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
        with contextlib.suppress(OSError):  # only for the message a waiter gets: a full disk
            atomic_write_bytes(owner_file, json.dumps(owner).encode())  # must fail the real write
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
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
    C library or the file system cannot do it (the caller then renames twice); OSError for any other
    failure (EBUSY of a mount point)."""
    rename_exchange = 2
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(b))


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
    put back if the second rename fails. A folder that cannot be renamed (a mount point) is filled
    in place (`fill_in_place`). Leftovers of a kill are hidden siblings that remove_leftovers
    deletes."""
    new, folder = Path(new), resolve_destination(folder)
    try:
        _swap(new, folder)
    except OSError as exc:
        if exc.errno not in _IMMOVABLE or not folder.is_dir():
            raise
        fill_in_place(new, folder)
        shutil.rmtree(new, ignore_errors=True)
    fsync_path(folder.parent)


def _swap(new: Path, folder: Path) -> None:
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


def fill_in_place(new: Path, folder: Path) -> None:
    """Make `folder` hold exactly what `new` holds without renaming `folder` (a mount point cannot
    be renamed): every file is copied in and replaces its namesake atomically, then what `new` does
    not hold is deleted. A reader sees each file old or new whole, but may see a mix of the two sets
    meanwhile; the one-step swap needs a folder that can be renamed."""
    new, folder = Path(new), Path(folder)
    for src in sorted(new.rglob("*")):
        dst = folder / src.relative_to(new)
        if src.is_dir() and not src.is_symlink():
            if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
                dst.unlink()
            dst.mkdir(exist_ok=True)
            continue
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        with atomic_path(dst) as tmp:
            shutil.copy2(src, tmp)
        fsync_path(dst.parent)
    keep = {p.relative_to(new) for p in new.rglob("*")}
    for path in sorted(folder.rglob("*"), reverse=True):  # children before their folder
        if path.relative_to(folder) not in keep:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    fsync_path(folder)


def fsync_path(path: Path) -> None:
    """fsync a file or folder by path (a folder's entry list is durable only once it is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_folder(folder: Path, wait: float = WRITER_WAIT_S, lock: bool = True) -> Iterator[Path]:
    """A new empty folder beside `folder` to write into; a clean exit replaces `folder` with it
    (replace_folder), an exception deletes it and leaves `folder` as it was. The lock beside
    `folder` is held throughout: another writer of it waits up to `wait` seconds, then gets
    FolderBusyError naming the holder. lock=False for callers whose own lock covers the folder (a
    stage under its run folder's lock); a folder inside another staged folder is private to its
    writer and never locked. An OSError names the file under `folder` it was about, not the
    temporary folder's."""
    folder = resolve_destination(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    private = any(folder == p or p in folder.parents for p in _PRIVATE)
    guard = folder_lock(folder, lock_beside(folder), wait) if lock and not private else None
    with guard or contextlib.nullcontext():
        remove_leftovers(folder)
        tmp = _sibling(folder, _TEMP_SUFFIX)
        os.mkdir(tmp)  # not mkdtemp: its 0700 mode would become the folder's mode
        _PRIVATE.add(tmp)
        try:
            yield tmp
            replace_folder(tmp, folder)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            mapped = _in_destination(os_error(exc, folder), tmp, folder)
            if mapped is not exc:
                raise mapped from exc
            raise
        finally:
            _PRIVATE.discard(tmp)


def _in_destination(exc: BaseException, tmp: Path, folder: Path) -> BaseException:
    """`exc` with a path under the temporary folder `tmp` renamed to the same path under `folder`."""
    if not isinstance(exc, OSError) or exc.filename is None or exc.errno is None:
        return exc
    try:
        rel = Path(os.fsdecode(exc.filename)).relative_to(tmp)
    except ValueError:
        return exc
    return OSError(exc.errno, exc.strerror, str(folder / rel))


def writable_folder(out: Path, what: str, error: type[Exception] = ValueError) -> Path:
    """`out` created (with its parents) and writable, before any work goes into it; otherwise
    `error` naming it as `what` ("run folder", "output folder"): a file at or above it, a folder
    that cannot be created, or one that cannot be written."""
    out = Path(out)
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                where = "is" if parent == out else f"is under {parent}, which is"
                raise error(f"{what} {out} {where} a file, not a folder")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(f"cannot create {what} {out}: {exc.strerror}") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise error(f"{what} {out} is not writable")
    return out
