"""Stage markers: what makes a rerun skip finished work, an interrupted run resume, and a damaged
or edited output get noticed and redone.

A stage is a folder of outputs plus its marker `.stage.json`. How a stage declares itself:

- its settings: `digest(...)` of everything that shapes its outputs (the stage's config
  dataclasses, ranks, alphas, seeds, upstream digests, checksums of external inputs). Two runs
  with the same digest must write the same outputs; anything left out is a cache bug.
- its outputs: every file under its folder, found by walking it when `write_marker` runs (no list
  to keep up to date). Names starting with "." (the marker, locks, temporary files) are not
  outputs. A folder that holds its own marker inside a stage folder is a separate stage.

`write_marker(folder, stage, digest, seconds, **info)` runs after every output is written and
records the digest, the sha256 of every output file, and a sha256 of the marker's own content.
`is_done(folder, digest)` is true only when the marker is intact, holds that digest, and every
output it lists is present with its checksum and no unlisted file has appeared; otherwise it says
which path failed (one line) and the stage is redone. `clear_marker(folder)` before redoing work
removes the marker first, then the old outputs, so a run killed half-way through never leaves a
marker that claims them nor a file of an older run that a new marker would list. Stages that write
several files can instead write into `stage_output(folder)`, a temporary folder that replaces the
stage folder in one rename when the block ends (marker included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from attrspace.util.files import atomic_write_bytes
from attrspace.util.folders import staged_folder

MARKER = ".stage.json"
# Bumped whenever a stage's outputs change meaning for the same configuration.
PIPELINE_VERSION = 1
MARKER_VERSION = 2  # 2: output checksums and a self-checksum


class StageFileError(ValueError):
    """A marker or stage output that cannot be read back or does not hold what it should."""


def _canonical(obj):
    """JSON-ready form of configs: dataclasses as dicts, tuples as lists, paths as strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot hash a {type(obj).__name__} into a stage digest")


def digest(*parts) -> str:
    """sha256 of the canonical JSON of `parts` (configs, upstream digests, file checksums)."""
    text = json.dumps([PIPELINE_VERSION, *map(_canonical, parts)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data) -> None:
    """Write JSON atomically (attrspace._io.atomic_write_bytes)."""
    atomic_write_bytes(Path(path), json.dumps(data, indent=1, sort_keys=True).encode())


def read_json(path: Path, required: tuple[str, ...] = ()) -> dict:
    """A JSON object written by the pipeline, with its required keys; StageFileError otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StageFileError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise StageFileError(f"{path}: expected a JSON object")
    missing = [k for k in required if k not in data]
    if missing:
        raise StageFileError(f"{path}: lacks {missing}")
    return data


def output_files(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every output file of the stage in `folder` (see the module
    docstring: hidden names and nested stage folders are left out)."""
    folder = Path(folder)
    found: dict[str, str] = {}

    def walk(directory: Path) -> None:
        for path in sorted(directory.iterdir()):
            if path.name.startswith("."):
                continue
            if path.is_dir() and not path.is_symlink():
                if not (path / MARKER).exists():
                    walk(path)
            else:
                found[path.relative_to(folder).as_posix()] = file_sha256(path)

    if folder.is_dir():
        walk(folder)
    return found


def _self_sum(marker: dict) -> str:
    body = {k: v for k, v in marker.items() if k != "marker_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_marker(folder: Path) -> dict | None:
    """The marker of `folder`, None when there is none; StageFileError when it is malformed, of
    an older format, or its content does not match its own checksum."""
    path = Path(folder) / MARKER
    if not path.exists():
        return None
    marker = read_json(path, ("stage", "digest", "seconds", "finished"))
    if not isinstance(marker["digest"], str) or len(marker["digest"]) != 64:
        raise StageFileError(f"{path}: digest is not a sha256 hex string")
    if marker.get("version") != MARKER_VERSION or not isinstance(marker.get("files"), dict):
        raise StageFileError(f"{path}: a marker of an older format (no output checksums)")
    if marker.get("marker_sha256") != _self_sum(marker):
        raise StageFileError(f"{path}: does not match its own checksum (edited or corrupt)")
    return marker


def verify_outputs(folder: Path, marker: dict) -> str | None:
    """None when the outputs of `folder` are exactly those its marker lists, with their
    checksums; else what is wrong, naming the path."""
    folder = Path(folder)
    listed: dict = marker["files"]
    present = output_files(folder)
    for rel, sha in sorted(listed.items()):
        if rel not in present:
            return f"{folder / rel}: missing (listed in {folder / MARKER})"
        if present[rel] != sha:
            return f"{folder / rel}: does not match its sha256 in {folder / MARKER} (corrupt or edited)"
    extra = sorted(set(present) - set(listed))
    if extra:
        return (
            f"{folder / extra[0]}: not an output of this stage ({folder / MARKER} does not list it)"
        )
    return None


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def is_done(folder: Path, expected: str, say: Callable[[str], None] = _warn) -> bool:
    """Whether `folder` holds finished, intact work of digest `expected`. A malformed marker or an
    output that fails verification counts as not done (the work is redone) and is reported by path
    in one line through `say` (default: stderr, also under --quiet); a marker of another digest is a changed setting, redone quietly."""
    try:
        marker = read_marker(folder)
    except StageFileError as exc:
        say(f"attrspace: {exc}; redoing this stage")
        return False
    if marker is None or marker["digest"] != expected:
        return False
    problem = verify_outputs(folder, marker)
    if problem is not None:
        say(f"attrspace: {problem}; redoing this stage")
        return False
    return True


def clear_marker(folder: Path) -> None:
    """Before a stage is redone: remove the marker (first, so a kill from here on leaves a folder
    that is not done), then every other output of the folder: hidden files (a lock) and nested
    stage folders, at any depth, stay."""
    folder = Path(folder)
    (folder / MARKER).unlink(missing_ok=True)
    if folder.is_dir():
        _remove_outputs(folder)


def _remove_outputs(directory: Path) -> None:
    for path in directory.iterdir():
        if path.name.startswith("."):
            continue
        if path.is_dir() and not path.is_symlink():
            if not (path / MARKER).exists():
                _remove_outputs(path)
                if not any(path.iterdir()):
                    path.rmdir()
        else:
            path.unlink()


def write_marker(folder: Path, stage: str, expected: str, seconds: float, **info) -> dict:
    """Mark `folder` finished (call after every output is written): records the digest, the
    checksum of every output file and its own checksum. Returns the marker."""
    marker = {
        **info,
        "stage": stage,
        "digest": expected,
        "seconds": float(seconds),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "version": MARKER_VERSION,
        "files": output_files(folder),
    }
    marker["marker_sha256"] = _self_sum(marker)
    write_json_atomic(Path(folder) / MARKER, marker)
    return marker


@contextlib.contextmanager
def stage_output(folder: Path) -> Iterator[Path]:
    """Write a stage into the yielded temporary folder (outputs, then write_marker on it); a clean
    exit replaces `folder` with it in one rename, an exception leaves no trace of it."""
    with staged_folder(Path(folder)) as tmp:
        yield tmp
