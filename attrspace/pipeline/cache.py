"""Stage markers: what makes a rerun skip finished work and an interrupted run resume.

A stage writes its outputs first and then `.stage.json` (temp file + os.replace) holding the digest
of everything that produced them. Work is done iff its folder's marker holds the expected digest;
before redoing work the old marker is removed, so a run killed half-way through rewriting outputs
never leaves a marker that claims them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from attrspace._io import atomic_write_bytes

MARKER = ".stage.json"
# Bumped whenever a stage's outputs change meaning for the same configuration.
PIPELINE_VERSION = 1


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


def read_marker(folder: Path) -> dict | None:
    """The marker of `folder`, None when there is none; StageFileError when it is malformed."""
    path = Path(folder) / MARKER
    if not path.exists():
        return None
    marker = read_json(path, ("stage", "digest", "seconds", "finished"))
    if not isinstance(marker["digest"], str) or len(marker["digest"]) != 64:
        raise StageFileError(f"{path}: digest is not a sha256 hex string")
    return marker


def is_done(folder: Path, expected: str) -> bool:
    """Whether `folder` holds finished work of digest `expected`. A malformed marker counts as not
    done (the work is redone and the marker rewritten) and is reported on stdout."""
    try:
        marker = read_marker(folder)
    except StageFileError as exc:
        print(f"attrspace: {exc}; redoing this stage")
        return False
    return marker is not None and marker["digest"] == expected


def clear_marker(folder: Path) -> None:
    """Remove the marker before outputs are rewritten."""
    (Path(folder) / MARKER).unlink(missing_ok=True)


def write_marker(folder: Path, stage: str, expected: str, seconds: float, **info) -> dict:
    """Mark `folder` finished (call after every output is written). Returns the marker."""
    marker = {
        "stage": stage,
        "digest": expected,
        "seconds": float(seconds),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **info,
    }
    write_json_atomic(Path(folder) / MARKER, marker)
    return marker
