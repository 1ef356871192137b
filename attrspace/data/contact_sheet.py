"""A contact sheet PNG: one row per dataset, a few views of a few scenes per row, so a person can
see that only the family's attribute changes along a row (PIL, imported only here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from attrspace.data.families import MIXED
from attrspace.data.scene import ATTRIBUTES
from attrspace.data.storage import MultiViewDataset

_LABEL_PAD = 12
_GAP_VIEW = 2
_GAP_SCENE = 8
_GAP_ROW = 6
_TITLE_H = 18


def _pil():
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:
        raise ImportError("contact sheets need Pillow: pip install pillow") from exc
    return Image, ImageDraw


def make_contact_sheet(rows: Sequence[tuple[str, Tensor]], title: str, min_tile: int = 112):
    """rows: (label, images (N scenes, V views, 3, H, W) float in [0, 1] or uint8) -> a PIL image.

    Tiles are enlarged by an integer factor (nearest neighbour) to at least `min_tile` pixels
    high."""
    if not rows:
        raise ValueError("make_contact_sheet needs at least one row")
    image_mod, draw_mod = _pil()
    _, _, _, h, w = rows[0][1].shape
    zoom = max(1, -(-min_tile // h))
    th, tw = h * zoom, w * zoom
    n_scenes = max(r[1].shape[0] for r in rows)
    n_views = max(r[1].shape[1] for r in rows)
    scene_w = n_views * tw + (n_views - 1) * _GAP_VIEW
    probe = draw_mod.Draw(image_mod.new("RGB", (1, 1)))
    label_w = _LABEL_PAD + int(max(probe.textlength(label) for label, _ in rows))
    width = label_w + n_scenes * scene_w + (n_scenes - 1) * _GAP_SCENE
    height = _TITLE_H + len(rows) * (th + _GAP_ROW)
    sheet = image_mod.new(
        "RGB", (max(width, int(probe.textlength(title)) + 8), height), (255, 255, 255)
    )
    draw = draw_mod.Draw(sheet)
    draw.text((4, 3), title, fill=(0, 0, 0))
    for r, (label, images) in enumerate(rows):
        if images.ndim != 5 or images.shape[2] != 3 or tuple(images.shape[3:]) != (h, w):
            raise ValueError(
                f"row {label!r}: images must be (N, V, 3, {h}, {w}), got {tuple(images.shape)}"
            )
        if images.dtype != torch.uint8:
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        y = _TITLE_H + r * (th + _GAP_ROW)
        draw.text((4, y + th // 2 - 6), label, fill=(0, 0, 0))
        for s in range(images.shape[0]):
            for v in range(images.shape[1]):
                tile = (
                    images[s, v]
                    .permute(1, 2, 0)
                    .repeat_interleave(zoom, 0)
                    .repeat_interleave(zoom, 1)
                )
                x = label_w + s * (scene_w + _GAP_SCENE) + v * (tw + _GAP_VIEW)
                sheet.paste(image_mod.fromarray(tile.contiguous().numpy()), (x, y))
    return sheet


def contact_sheet_from_folder(
    root: str | Path, out_png: str | Path, scenes: int = 4, views: int = 2, min_tile: int = 112
) -> Path:
    """Write a contact sheet of a stored family: its first `scenes` scenes and `views` views per
    dataset. Returns the PNG path."""
    data = MultiViewDataset(root)
    m = data.manifest
    rows = []
    for ds in m["datasets"]:
        keep = MultiViewDataset(root, datasets=[ds["name"]])
        n = min(scenes, len(keep))
        rows.append((ds["name"], torch.stack([keep[k]["images"][:views] for k in range(n)])))
    family = m["family"]
    if family in ATTRIBUTES:
        what = f"only '{family}' varies along a row"
    elif family == MIXED:
        what = "everything varies"
    else:
        what = "held-out downstream task"
    sheet = make_contact_sheet(
        rows, f"{family} (seed {m['seed']}): {what}; columns = scenes x views", min_tile
    )
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
