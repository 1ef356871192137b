"""The `render` subcommand and the contact sheet it writes."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from attrspace.cli.args import add_render_parser
from attrspace.data.contact_sheet import make_contact_sheet
from attrspace.data.storage import MultiViewDataset, read_manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attrspace")
    add_render_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_render_command_writes_a_family_and_a_contact_sheet(tmp_path, capsys):
    image_mod = pytest.importorskip("PIL.Image", reason="contact sheets need Pillow")
    out = tmp_path / "lighting"
    args = _parser().parse_args(
        [
            "render",
            "--attribute",
            "lighting",
            "--datasets",
            "2",
            "--scenes",
            "3",
            "--views",
            "2",
            "--size",
            "28",
            "--seed",
            "3",
            "--out",
            str(out),
            "--sheet-scenes",
            "2",
        ]
    )
    assert args.func(args) == 0
    m = read_manifest(out)
    assert (m["family"], m["n_datasets"], m["scenes_per_dataset"], m["views"], m["seed"]) == (
        "lighting",
        2,
        3,
        2,
        3,
    )
    assert len(MultiViewDataset(out)) == 6
    with image_mod.open(out / "contact_sheet.png") as png:
        width, height = png.size
        pixels = torch.from_numpy(np.asarray(png.convert("RGB")).copy())
    # 28 px tiles are enlarged 4x to 112: 2 rows of tiles, 2 scenes x 2 views per row
    assert height > 2 * 112 and width > 4 * 112
    assert pixels.float().std() > 10  # renders, not a blank page
    assert "contact sheet" in capsys.readouterr().out
    # The same command again: the family is verified and left alone.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert args.func(args) == 0
    assert "nothing to do" in capsys.readouterr().out
    # Another seed into the same folder: refused, naming the flag; nothing is lost.
    args.seed = 4
    with pytest.raises(FileExistsError, match=r"seed 3 -> 4.*--overwrite"):
        args.func(args)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_render_command_rejects_bad_arguments(tmp_path):
    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["render", "--attribute", "colour", "--out", str(tmp_path)])
    args = parser.parse_args(
        ["render", "--attribute", "texture", "--size", "50", "--out", str(tmp_path)]
    )
    with pytest.raises(ValueError, match="multiples of 14"):
        args.func(args)


def test_contact_sheet_places_every_tile():
    pytest.importorskip("PIL", reason="contact sheets need Pillow")
    rows = [("a", torch.full((2, 3, 3, 14, 14), 0.2)), ("b", torch.ones(2, 3, 3, 14, 14))]
    sheet = make_contact_sheet(rows, "title", min_tile=28)
    img = torch.from_numpy(np.asarray(sheet).copy())
    assert img.shape == (sheet.size[1], sheet.size[0], 3)
    assert (img == 51).all(-1).sum() == 6 * 28 * 28  # row a: six grey 28 x 28 tiles (0.2 * 255)
    with pytest.raises(ValueError, match="images must be"):
        make_contact_sheet(
            [("a", torch.zeros(2, 3, 3, 14, 14)), ("b", torch.zeros(2, 3, 14, 14))], "t"
        )
