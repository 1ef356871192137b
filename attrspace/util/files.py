"""Files written atomically (`atomic_path`, the one writer) and read back within bounds
(`read_bytes` / `read_text` / `read_json` / `regular_file`, the one reader): what a reader opens
must be a regular file (a FIFO would block it forever, a link to /dev/zero would fill memory), of a
bounded size, and JSON of a bounded depth; anything else is a BadFileError naming the path and what
it found."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
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


# Configs, caches, markers, run logs and safetensors headers are kilobytes; 64 MiB leaves room for
# any honest one and keeps a wrong file from filling memory.
MAX_TEXT_BYTES = 64 << 20
# Nesting deeper than any file this package writes or reads (peft configs, markers: under 10).
MAX_JSON_DEPTH = 100


class BadFileError(ValueError):
    """A file a reader refuses: not a regular file, too large, not UTF-8, or JSON it cannot hold."""


def describe_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, words in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return words
    return "not a regular file"


def regular_file(path: Path) -> os.stat_result:
    """The stat of `path` (links followed) when it is a regular file; BadFileError saying what it is
    otherwise. A stat never blocks, an open of a FIFO does: every reader calls this first."""
    path = Path(path)
    info = os.stat(path)  # FileNotFoundError / PermissionError name the path themselves
    if not stat.S_ISREG(info.st_mode):
        via = f" a link to {os.path.realpath(path)}, which" if path.is_symlink() else ""
        raise BadFileError(
            f"{path}:{via} is {describe_kind(info.st_mode)}, not a regular file; "
            "replace it with the file it should be"
        )
    return info


def read_bytes(path: Path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of regular file `path`, at most `limit` of them (BadFileError beyond). Opened
    non-blocking, and checked again on the open descriptor, so a FIFO swapped in after the stat is
    refused, not waited on."""
    path = Path(path)
    regular_file(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadFileError(f"{path}: is {describe_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise BadFileError(
                f"{path}: is {info.st_size} bytes, more than the {limit} this file can hold; "
                "is it the right file?"
            )
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while it was read
        raise BadFileError(f"{path}: holds more than {limit} bytes; is it the right file?")
    return data


def read_text(path: Path, limit: int = MAX_TEXT_BYTES) -> str:
    """read_bytes decoded as UTF-8; BadFileError naming the first byte that is not."""
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadFileError(
            f"{path}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})"
        ) from None


def parse_json(text: str | bytes, where: str, max_depth: int = MAX_JSON_DEPTH, **kwargs):
    """json.loads with the nesting bounded: BadFileError (never a RecursionError) naming `where`."""
    try:
        value = json.loads(text, **kwargs)
    except RecursionError:
        raise BadFileError(f"{where}: JSON nested too deep to read") from None
    except ValueError as exc:  # JSONDecodeError, or a parse hook's refusal
        raise BadFileError(f"{where}: not valid JSON ({exc})") from exc
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise BadFileError(f"{where}: JSON nested deeper than {max_depth} levels")
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return value


def read_json(path: Path, limit: int = MAX_TEXT_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """The JSON value of file `path`, read by read_text and parsed by parse_json."""
    return parse_json(read_text(path, limit), str(path), max_depth)


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    regular_file(path)  # a FIFO or a device is said to be one (and never opened)
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
        yield Path(tmp)
        # after the block: a writer that recreates the file (safetensors' save_file makes it 0600)
        # must not decide who can read the result
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        mapped = os_error(exc, path, hide=tmp)
        if mapped is not exc:
            raise mapped from exc
        raise


# How Rust prints an io::Error from the system: "... (os error 28)" or "Os { code: 28, ... }".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def os_error(
    exc: BaseException, path: Path, hide: str | os.PathLike | None = None
) -> BaseException:
    """The OSError a user should see for a failed write of `path`: an OSError that names no file,
    or names the temporary file `hide`, is given `path`; a safetensors error caused by the system
    (its message carries Rust's `(os error N)`, as a full disk gives) becomes that OSError.
    Anything else is returned as it is."""
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.filename is None or (
            hide is not None and os.fspath(exc.filename) == os.fspath(hide)
        ):
            return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))
        return exc
    if isinstance(exc, SafetensorError):
        found = _RUST_OS_ERROR.search(str(exc))
        if found:
            code = int(found.group(1) or found.group(2))
            return OSError(code, os.strerror(code), str(path))
    return exc


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
