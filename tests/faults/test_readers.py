"""Every reader of a config, cache, marker, manifest or header file, handed a FIFO or a link to
/dev/zero where its file should be: a one-line error saying what the path is, never a block on the
open and never a read until memory runs out. Cross-cutting: the one reader (util.files) is what each
of these goes through."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from attrspace.bank import SubspaceBank
from attrspace.data.folder import read_cameras
from attrspace.data.storage import read_manifest
from attrspace.export.peft_folder import load_peft
from attrspace.models.vggt.checkpoint import load_checkpoint
from attrspace.models.vggt.config import VGGTConfig
from attrspace.models.vggt.model import VGGT
from attrspace.pipeline.cache import read_marker
from attrspace.train.config import read_config_file
from attrspace.train.resumable import load_state

READERS = {
    "peft adapter config": ("adapter/adapter_config.json", lambda t: load_peft(t / "adapter")),
    "stage marker": ("stage/.stage.json", lambda t: read_marker(t / "stage")),
    "family manifest": ("family/manifest.json", lambda t: read_manifest(t / "family")),
    "scene cameras": ("scene/cameras.json", lambda t: read_cameras(t / "scene")),
    "model config.json": ("model/config.json", lambda t: VGGTConfig.load(t / "model")),
    "training config": ("run.yaml", lambda t: read_config_file(t / "run.yaml")),
    "bank": ("bank.safetensors", lambda t: SubspaceBank.load(t / "bank.safetensors")),
    "checkpoint": (
        "model.safetensors",
        lambda t: load_checkpoint(VGGT(VGGTConfig.tiny()), t / "model.safetensors"),
    ),
    "checkpoint index": (
        "snap/model.safetensors.index.json",
        lambda t: load_checkpoint(VGGT(VGGTConfig.tiny()), t / "snap"),
    ),
    "resumable state": ("state.safetensors", lambda t: _load_state(t / "state.safetensors")),
}


def _load_state(path: Path):
    model = torch.nn.Linear(2, 2)
    return load_state(path, model, torch.optim.SGD(model.parameters(), lr=0.1), "digest")


def _call_without_blocking(fn, fifo: Path):
    caught = []

    def call():
        try:
            fn()
        except BaseException as exc:  # handed to the test
            caught.append(exc)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the reader, then fail
        pytest.fail("the reader blocked on a FIFO")
    assert caught, "a FIFO was read as if it were the file"
    return caught[0]


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
@pytest.mark.parametrize("reader", list(READERS))
def test_a_reader_says_what_stands_in_place_of_its_file(tmp_path, reader, kind):
    rel, read = READERS[reader]
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    if kind == "fifo":
        os.mkfifo(path)
        fifo = path
    else:
        path.symlink_to("/dev/zero")
    exc = _call_without_blocking(lambda: read(tmp_path), fifo)
    words = "FIFO" if kind == "fifo" else "character device"
    assert isinstance(exc, ValueError | OSError), repr(exc)
    message = " ".join(str(exc).split())
    assert words in message and str(path) in message, message
