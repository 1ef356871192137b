"""Under torchrun the run log counts each job once: run by any rank in this invocation, or taken
from the cache; and runs.json records the command line however attrspace was started."""

import json
import sys
from pathlib import Path

import pytest

import attrspace.pipeline
from attrspace.cli.main import main
from attrspace.pipeline.run import command_argv


def test_two_ranks_log_each_job_once_as_ran_or_cached(tmp_path):
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    import spread_counts_worker

    (tmp_path / "job3").write_text("earlier")  # cached from an earlier run
    mp.start_processes(
        spread_counts_worker.counts_worker, (2, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    events = json.loads((tmp_path / "events.json").read_text())
    assert sorted(map(tuple, events)) == [
        ("job0", "ran"),
        ("job1", "ran"),  # run by rank 1, found cached by rank 0's second pass
        ("job2", "ran"),
        ("job3", "cached"),
    ]
    assert [(tmp_path / f"job{i}").read_text() for i in range(3)] == ["0", "1", "0"]


def test_command_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/lib/attrspace/__main__.py", "run", "--out", "x"])
    assert command_argv() == ["run", "--out", "x"]  # python -m attrspace, torchrun -m attrspace
    monkeypatch.setattr(sys, "argv", ["/usr/bin/attrspace", "mine"])
    assert command_argv() == ["mine"]
    monkeypatch.setattr(sys, "argv", ["train_my_model.py", "--lr", "1"])
    assert command_argv() is None
    assert command_argv(["run", "--preset", "micro"]) == ["run", "--preset", "micro"]


def test_the_cli_hands_its_argv_to_the_run_log(tmp_path, monkeypatch):
    seen = {}

    def fake_run_pipeline(preset, out, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(attrspace.pipeline, "run_pipeline", fake_run_pipeline)
    argv = ["pretrain", "--preset", "micro", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    assert seen["argv"] == argv and seen["command"] == "pretrain"


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
