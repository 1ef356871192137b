"""Fault injection on the micro pipeline: every kind of file it writes, bit-flipped or truncated,
is noticed by path and redone; an edited adapter config is noticed; a second process on a run
folder is refused and a killed one's lock is taken over; a SIGKILLed run resumes to the same
outputs as an uninterrupted one; a damaged runs.json is kept aside."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from attrspace.cli.main import main
from attrspace.pipeline import StageFileError, Workspace, get_preset, run_pipeline, run_stages
from attrspace.pipeline.cache import MARKER, read_marker, verify_outputs
from attrspace.pipeline.report.results import collect
from attrspace.pipeline.workspace import RunInputError

MICRO = get_preset("micro")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

# One file of every kind the pipeline writes -> the stage that must be redone when it is damaged.
FILES = {
    "shard": ("data/texture/texture_00/shard_00000.safetensors", "data/texture"),
    "manifest": ("data/camera/manifest.json", "data/camera"),
    "base weights": ("base/model.safetensors", "base"),
    "lora weights": (
        "loras/texture/texture_01/adapter_model.safetensors",
        "loras/texture/texture_01",
    ),
    "adapter config": ("loras/camera/camera_00/adapter_config.json", "loras/camera/camera_00"),
    "metrics": ("finetune/photo/lora/metrics.json", "finetune/photo/lora"),
    "stage marker": (f"loras/camera/camera_01/{MARKER}", "loras/camera/camera_01"),
    "bank": ("mine/bank.safetensors", "mine"),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run_pipeline(MICRO, out, progress=False)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _content(path: Path):
    """What a file holds: tensors and metadata of a safetensors file, else its bytes."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _same(a, b) -> bool:
    if isinstance(a, bytes) or isinstance(b, bytes):
        return a == b
    return (
        a[0] == b[0]
        and a[1].keys() == b[1].keys()
        and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    )


def _all_stages_verify(run: Path) -> None:
    for marker in run.rglob(MARKER):
        assert verify_outputs(marker.parent, read_marker(marker.parent)) is None, marker


def _damage(path: Path, fault: str) -> None:
    data = bytearray(path.read_bytes())
    if fault == "bit flip":
        data[len(data) // 2] ^= 0x04
    else:
        data = data[: len(data) * 2 // 3]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["bit flip", "truncation"])
@pytest.mark.parametrize("kind", list(FILES))
def test_a_damaged_file_is_reported_by_path_and_redone(finished, tmp_path, capsys, kind, fault):
    rel, stage = FILES[kind]
    run = _copy(finished, tmp_path / "run")
    path = run / rel
    _damage(path, fault)
    ws = Workspace(run, MICRO, progress=False)
    run_stages(ws)
    err = capsys.readouterr().err
    assert str(path) in err and "redoing this stage" in err
    assert stage in ws.ran()
    assert ws.ran("data") == (
        [stage] if stage.startswith("data") else []
    )  # nothing else re-renders
    _all_stages_verify(run)
    if kind not in ("metrics", "stage marker"):  # those hold timings, the rest is deterministic
        assert _same(_content(path), _content(finished / rel))


def test_an_edited_lora_alpha_is_seen(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    config = run / "loras" / "texture" / "texture_00" / "adapter_config.json"
    data = json.loads(config.read_text())
    data["lora_alpha"] *= 2
    config.write_text(json.dumps(data))
    ws = Workspace(run, MICRO, progress=False)
    run_stages(ws, until="mine")
    assert ws.ran() == ["loras/texture/texture_00"] and str(config) in capsys.readouterr().err
    assert json.loads(config.read_text())["lora_alpha"] == MICRO.lora_alpha
    # LoRAs from elsewhere (nothing to redo them): an edited alpha changes the mine digest.
    external = _copy(finished / "loras", tmp_path / "external")
    ws = Workspace(run, MICRO, loras_dir=external, progress=False)
    run_stages(ws, until="mine")
    ws = Workspace(run, MICRO, loras_dir=external, progress=False)
    run_stages(ws, until="mine")
    assert ws.ran() == []
    config = external / "camera" / "camera_01" / "adapter_config.json"
    data = json.loads(config.read_text())
    data["lora_alpha"] = data["lora_alpha"] - 1
    config.write_text(json.dumps(data))
    ws = Workspace(run, MICRO, loras_dir=external, progress=False)
    run_stages(ws, until="mine")
    assert ws.ran() == ["mine"]


def test_an_edited_metric_never_reaches_the_report(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    metrics = run / "finetune" / "photo" / "subspace" / "metrics.json"
    record = json.loads(metrics.read_text())
    record["test"]["abs_rel"] = 0.0001
    metrics.write_text(json.dumps(record))
    with pytest.raises(StageFileError, match=r"subspace/metrics\.json: does not match.*redoes it"):
        collect(run)
    code = main(["report", "--out", str(run)])
    assert code == 2


def test_a_garbage_run_log_is_kept_aside(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    (run / "runs.json").write_bytes(b'{"runs": [{"com\xff')
    run_pipeline(MICRO, run, progress=False, report=False)
    aside = list(run.glob("runs.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b'{"runs": [{"com\xff'
    assert str(aside[0]) in capsys.readouterr().err
    assert len(json.loads((run / "runs.json").read_text())["runs"]) == 1


HOLD = """
import sys, time
from pathlib import Path
from attrspace.pipeline.run import run_folder_lock
with run_folder_lock(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_second_process_is_refused_and_a_killed_holders_lock_taken_over(
    finished, tmp_path, capsys
):
    run = _copy(finished, tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert main(["run", "--preset", "micro", "--out", str(run), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("attrspace run: error: ")
        assert str(run) in err[0] and f"process {holder.pid} on host" in err[0]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    runs_before = len(json.loads((run / "runs.json").read_text())["runs"])
    assert main(["run", "--preset", "micro", "--out", str(run), "--quiet"]) == 0
    assert len(json.loads((run / "runs.json").read_text())["runs"]) == runs_before + 1


def test_a_sigkilled_run_resumes_to_the_uninterrupted_outputs(finished, tmp_path):
    run = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-m", "attrspace.cli.main", "run", "--preset", "micro", "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    first_lora = run / "loras" / "texture" / "texture_00" / MARKER
    deadline = time.monotonic() + 300
    while not first_lora.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)  # in the LoRA stage: later LoRAs, mine, finetune undone
    child.wait()
    assert first_lora.exists() and not (run / "mine" / MARKER).exists()
    ws = run_pipeline(MICRO, run, progress=False)
    assert "loras/texture/texture_00" not in ws.ran() and "mine" in ws.ran()
    assert not [p for p in run.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    for path in finished.rglob("*"):
        rel = path.relative_to(finished)
        if path.is_file() and (path.suffix == ".safetensors" or path.name.endswith("config.json")):
            assert _same(_content(run / rel), _content(path)), rel
        if path.name == "metrics.json":
            assert (
                json.loads((run / rel).read_text())["test"] == json.loads(path.read_text())["test"]
            )
        if path.name == "manifest.json":
            assert (run / rel).read_bytes() == path.read_bytes()


# -- inputs checked before work, one-line errors that name the path ------------------------------


def _one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_bogus_backend_is_refused_before_any_stage(tmp_path, monkeypatch, capsys):
    # It used to render, pre-train, train the LoRAs and mine before the first adapted layer failed.
    monkeypatch.setenv("ATTRSPACE_BACKEND", "bogus")
    run = tmp_path / "run"
    line = _one_line(capsys, ["run", "--preset", "micro", "--out", str(run), "--quiet"])
    assert line.startswith("attrspace run: error: environment variable ATTRSPACE_BACKEND=")
    assert "'bogus' names no backend" in line and "torch" in line
    assert not run.exists()
    with pytest.raises(RunInputError, match="ATTRSPACE_BACKEND='bogus'"):
        run_pipeline(MICRO, run, progress=False)
    assert not run.exists()
    line = _one_line(capsys, ["backends"])  # the listing on stdout, then the flag on stderr
    assert line.startswith("attrspace backends: error: ") and "'bogus'" in line


@pytest.mark.parametrize("content", ["empty", "other files"])
def test_report_on_a_folder_that_is_no_run_is_an_error(tmp_path, capsys, content):
    folder = tmp_path / "not a run"
    folder.mkdir()
    if content == "other files":
        (folder / "notes.txt").write_text("mine")
        (folder / "sub").mkdir()
    line = _one_line(capsys, ["report", "--out", str(folder)])
    assert line.startswith(f"attrspace report: error: {folder}: not a run folder")
    assert not (folder / "report.md").exists()


def test_a_full_disk_during_a_stage_is_one_line_naming_the_path(
    finished, tmp_path, monkeypatch, capsys
):
    run = _copy(finished, tmp_path / "run")
    shutil.rmtree(run / "base")
    real = Path.write_bytes

    def full(self, data):  # the way a full disk surfaces: write() fails, naming no file
        if self.name.startswith(".model.safetensors."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    line = _one_line(capsys, ["pretrain", "--preset", "micro", "--out", str(run), "--quiet"])
    assert (
        line
        == f"attrspace pretrain: error: No space left on device: {run / 'base'}/model.safetensors"
    )
    monkeypatch.undo()
    assert main(["pretrain", "--preset", "micro", "--out", str(run), "--quiet"]) == 0  # redone
    _all_stages_verify(run)
    assert _same(
        _content(run / "base/model.safetensors"), _content(finished / "base/model.safetensors")
    )


def test_every_output_follows_the_umask(finished):
    # The fixture's run wrote under this process's umask; peft's LoRA folders came out 0700 / 0600.
    umask = os.umask(0)
    os.umask(umask)
    wrong = [
        (p.relative_to(finished).as_posix(), oct(p.stat().st_mode & 0o777))
        for p in [finished, *finished.rglob("*")]
        if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~umask
    ]
    assert wrong == []


def test_a_fifo_among_the_outputs_is_named_and_redone(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    config = run / "loras" / "camera" / "camera_00" / "adapter_config.json"
    config.unlink()
    os.mkfifo(config)  # hashing it blocked forever
    ws = Workspace(run, MICRO, progress=False)
    done = []
    worker = threading.Thread(target=lambda: done.append(run_stages(ws, until="train-lora")))
    worker.start()
    worker.join(300)
    if worker.is_alive():
        os.close(os.open(config, os.O_WRONLY | os.O_NONBLOCK))  # release it, then fail
        worker.join()
        pytest.fail("a FIFO among the outputs blocked the run")
    assert done and ws.ran() == ["loras/camera/camera_00"]
    assert f"{config}: is a FIFO (named pipe)" in capsys.readouterr().err
    assert config.is_file() and not config.is_symlink()
    _all_stages_verify(run)


def test_redo_hints_quote_paths_for_the_shell(finished, tmp_path):
    run = _copy(finished, tmp_path / "my run $HOME")
    metrics = run / "finetune" / "photo" / "lora" / "metrics.json"
    metrics.write_text("{}")
    with pytest.raises(StageFileError) as caught:
        collect(run)
    hint = str(caught.value).split("`")[1]
    assert shlex.split(hint)[-1] == str(run)  # one word, as a shell reads it
    ws = Workspace(run, MICRO, progress=False)
    assert shlex.split(ws.redo_command("pretrain"))[-1] == str(run)
