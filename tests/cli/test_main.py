"""Bad command lines end in one line `attrspace <cmd>: error: ...` and exit status 2, before any
work; two renders on one --out never destroy each other's data; a locked render folder names its
holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from attrspace.cli.main import main
from attrspace.data.storage import read_manifest

RENDER = ["render", "--attribute", "lighting", "--datasets", "1", "--scenes", "1", "--views", "2"]
RENDER += ["--size", "28", "--no-contact-sheet"]


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"attrspace {argv[0]}: error: "), lines
    return lines[0]


@pytest.fixture
def places(tmp_path) -> dict[str, str]:
    (tmp_path / "a_file").write_text("x")
    return {
        "FILE": str(tmp_path / "a_file"),
        "UNDER": str(tmp_path / "a_file" / "run"),
        "NEW": str(tmp_path / "new"),
        "READONLY": "/sys/attrspace-test-run",  # refused by the kernel even to root
    }


CASES = [
    (["run", "--preset", "micro", "--out", ""], "empty path"),
    (["run", "--preset", "micro", "--out", "FILE"], "FILE: exists and is a file"),
    (["run", "--preset", "micro", "--out", "UNDER"], "is a file, not a folder"),
    (["run", "--preset", "micro", "--out", "READONLY", "--quiet"], "READONLY"),
    (["run", "--preset", "micro", "--out", "NEW", "--seed", "1e23"], "--seed"),
    (["run", "--preset", "micro", "--out", "NEW", "--seed", str(10**23)], "2**63"),
    (["run", "--preset", "micro", "--out", "NEW", "--seed", "-1"], "--seed"),
    (["run", "--preset", "micro", "--out", "NEW", "--threads", "-1"], "--threads"),
    (["run", "--preset", "micro", "--out", "NEW", "--checkpoint", "NEW/x.pt"], "--checkpoint"),
    (["mine", "--preset", "micro", "--out", "NEW", "--loras", "NEW/none"], "--loras"),
    (["mine", "--preset", "micro", "--out", "NEW", "--rank", "0"], "--rank"),
    (["mine", "--preset", "micro", "--out", "NEW", "--single-attribute", "lighting"], "lighting"),
    (["report", "--out", "NEW"], "no such run folder"),
    (["report", "--out", ""], "empty path"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--tokens", "0"], "--tokens"),
    (["demo", "--tokens", "7"], "even"),
    (["demo", "--depth", "0"], "--depth"),
    (["demo", "--dim", "200"], "heads"),
    (["demo", "--seed", "1e23"], "--seed"),
    (["bench", "--device", "cuda:99"], "cuda"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--backend", "bogus"], "--backend"),
    (["bench", "--rank", "5000", "--d-in", "64"], "--rank"),
    (["bench", "--tokens", "0"], "--tokens"),
    ([*RENDER, "--out", ""], "empty path"),
    ([*RENDER, "--out", "FILE"], "is a file"),
    ([*RENDER, "--out", "READONLY"], "READONLY"),
    ([*RENDER, "--size", "30", "--out", "NEW"], "--size"),
    ([*RENDER, "--seed", "1e23", "--out", "NEW"], "--seed"),
    ([*RENDER, "--shard-scenes", "0", "--out", "NEW"], "--shard-scenes"),
]


@pytest.mark.parametrize(
    ("argv", "says"), CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES]
)
def test_bad_arguments_give_one_line_and_status_2(capsys, places, argv, says):
    argv = [places.get(a, a) for a in argv]
    for name, path in places.items():
        says = says.replace(name, path)
    line = _one_line_error(capsys, argv)
    assert says in line
    assert not Path(places["NEW"]).exists()  # checked before any work


def test_two_renders_with_different_seeds_keep_the_first(tmp_path, capsys):
    out = str(tmp_path / "fam")
    assert main([*RENDER, "--seed", "1", "--out", out]) == 0
    capsys.readouterr()  # the progress bar
    before = {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}
    line = _one_line_error(capsys, [*RENDER, "--seed", "2", "--out", out])
    assert "seed 1 -> 2" in line and "--overwrite" in line and "overwrite=True" not in line
    assert {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()} == before
    assert main([*RENDER, "--seed", "1", "--out", out]) == 0  # the same family: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert main([*RENDER, "--seed", "2", "--out", out, "--overwrite"]) == 0
    assert read_manifest(out)["seed"] == 2
    capsys.readouterr()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert "holds no family" in _one_line_error(capsys, [*RENDER, "--out", str(tmp_path / "notes")])


HOLD = """
import sys, time
from pathlib import Path
from attrspace.util.folders import folder_lock, lock_beside
folder = Path(sys.argv[1])
with folder_lock(folder, lock_beside(folder)):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_render_folder_in_use_names_its_holder(tmp_path, capsys):
    out = tmp_path / "fam"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        line = _one_line_error(capsys, [*RENDER, "--out", str(out)])
        assert str(out) in line and f"process {holder.pid} on host" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not out.exists()
    capsys.readouterr()
    assert main([*RENDER, "--out", str(out)]) == 0  # the dead holder's lock is taken over
    assert read_manifest(out)["family"] == "lighting"


def test_a_bug_keeps_its_traceback(monkeypatch):
    import attrspace.cli.demo

    def broken(*args, **kwargs):
        raise ValueError("an internal mistake")

    monkeypatch.setattr(attrspace.cli.demo, "run_demo", broken)
    with pytest.raises(ValueError, match="an internal mistake"):
        main(["demo", "--steps", "1"])
