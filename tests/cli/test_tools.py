"""`attrspace bench` and `demo`: every option documented with its default, a progress bar on stderr
(none with --quiet), and the timing note when a ratio is not resolved."""

import argparse

import pytest

from attrspace.cli.main import build_parser, main


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return choices[name]


@pytest.mark.parametrize("name", ["bench", "demo"])
def test_every_option_has_help_and_its_default(name):
    p = subparser(name)
    options = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 7
    for action in options:
        assert action.help and len(action.help) > 5, action.dest
    text = " ".join(p.format_help().split())
    assert text.count("(default: ") == len(options)


def test_demo_shows_progress_on_stderr_and_quiet_hides_it(capsys):
    args = ["demo", "--dim", "64", "--depth", "1", "--tokens", "32", "--steps", "2"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "demo steps" in err and "subspace / LoRA: trainable" in out
    assert main([*args, "--quiet"]) == 0
    assert "demo steps" not in capsys.readouterr().err


def test_bench_shows_progress_and_reports_ranges(capsys):
    args = ["bench", "--d-in", "32", "--d-out", "48", "--tokens", "16", "--rank", "4"]
    assert main([*args, "--lora-rank", "2", "--steps", "2", "--repeats", "2"]) == 0
    out, err = capsys.readouterr()
    assert "bench rounds" in err
    assert "over 2 interleaved repeats" in out and "x frozen" in out and "range" in out
