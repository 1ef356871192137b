"""Procedural solid textures: albedo as a function of a 3D point, vectorised over points.

Every pattern is shifted by a phase derived from the texture's seed, so no lattice boundary sits
exactly on a flat surface such as the floor (where rounding would make the pattern flicker).
Photographs come from scikit-image's bundled data images, imported only when a photo is used.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from attrspace.data.intersect import dot
from attrspace.data.scene import Texture

# scikit-image data images that ship inside the package (no download needed).
PHOTO_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "brick",
    "grass",
    "gravel",
    "camera",
)
_PHOTO_MAX_SIDE = 256
_MASK32 = 0xFFFFFFFF


def hash_uniform(cells: Tensor, seed: int, salt: int = 0) -> Tensor:
    """Integer lattice cells (..., 3) int64 -> uniform floats (...,) in [0, 1), a pure function.

    A 32-bit integer mix kept inside int64 range (every product stays below 2**62)."""
    h = cells[..., 0] * 73856093 ^ cells[..., 1] * 19349663 ^ cells[..., 2] * 83492791
    h = (h ^ (seed * 2654435761 + salt * 40503)) & _MASK32
    for _ in range(2):
        h = (((h >> 16) ^ h) * 0x45D9F3B) & _MASK32
    h = (h >> 16) ^ h
    return h.to(torch.float32) / 4294967296.0


def _phase(tex: Texture) -> Tensor:
    """(3,) spatial offset in [0.1, 0.9) cycles, from the seed."""
    cell = torch.tensor([[tex.seed, 7, 11], [13, tex.seed, 17], [19, 23, tex.seed]])
    return 0.1 + 0.8 * hash_uniform(cell, tex.seed, salt=1)


def _colors(tex: Texture) -> Tensor:
    return torch.tensor(tex.colors, dtype=torch.float32)


def _blend(tex: Texture, w: Tensor) -> Tensor:
    """Mix the first two colours with weights w (M,) in [0, 1] -> (M, 3)."""
    c = _colors(tex)
    return c[0] + w[:, None] * (c[1] - c[0])


def _value_noise(p: Tensor, seed: int, octaves: int) -> Tensor:
    """Fractal value noise at points (M, 3) -> (M,) in [0, 1]."""
    total = torch.zeros(p.shape[0])
    norm = 0.0
    corners = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    for octave in range(octaves):
        q = p * (2.0**octave)
        base = torch.floor(q)
        f = q - base
        f = f * f * (3.0 - 2.0 * f)  # smoothstep: no visible lattice creases
        vals = hash_uniform(base.long()[:, None, :] + corners, seed, salt=octave)  # (M, 8)
        w = torch.where(corners.bool(), f[:, None, :], 1.0 - f[:, None, :]).prod(-1)
        amp = 0.5**octave
        total += amp * (vals * w).sum(-1)
        norm += amp
    return total / norm


def _voronoi(tex: Texture, p: Tensor) -> Tensor:
    """Cells around random feature points, one colour per cell (drawn from tex.colors) -> (M, 3).

    Feature points sit in the middle 60% of their lattice cell and only the 2 x 2 x 2 cells nearest
    to p are searched (a standard shortcut: 8 instead of 27 candidates; it is still a pure function
    of the point, so every view sees the same pattern)."""
    base = torch.floor(p - 0.5).long()
    offs = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    cells = base[:, None, :] + offs  # (M, 8, 3)
    feature = 0.2 + 0.6 * torch.stack(
        [hash_uniform(cells, tex.seed, salt=s) for s in (11, 12, 13)], -1
    )
    diff = cells.to(torch.float32) + feature - p[:, None, :]
    d2 = (diff * diff).sum(-1)
    nearest = torch.gather(cells, 1, d2.argmin(1)[:, None, None].expand(-1, 1, 3))[:, 0]
    pick = hash_uniform(nearest, tex.seed, salt=14)
    colors = _colors(tex)
    idx = torch.clamp((pick * len(tex.colors)).long(), max=len(tex.colors) - 1)
    shade = 0.8 + 0.2 * hash_uniform(nearest, tex.seed, salt=15)
    return colors[idx] * shade[:, None]


@functools.lru_cache(maxsize=16)
def load_photo(name: str) -> Tensor:
    """(3, h, w) float32 RGB in [0, 1] of a scikit-image data image, longest side <= 256."""
    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; choose one of {PHOTO_NAMES}")
    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError("photo textures need scikit-image: pip install scikit-image") from exc
    img = torch.from_numpy(getattr(skimage.data, name)().copy())
    if img.ndim == 2:
        img = img[..., None].expand(-1, -1, 3)
    img = img[..., :3].permute(2, 0, 1).to(torch.float32) / 255.0
    scale = _PHOTO_MAX_SIDE / max(img.shape[1:])
    if scale < 1.0:
        img = F.interpolate(img[None], scale_factor=scale, mode="area")[0]
    return img.contiguous()


def _photo(tex: Texture, p: Tensor) -> Tensor:
    """Planar projection along tex.direction, tiled once per 1 / frequency world units."""
    axis = torch.tensor(tex.direction)
    helper = (
        torch.tensor([1.0, 0.0, 0.0])
        if abs(tex.direction[0]) < 0.9
        else torch.tensor([0.0, 1.0, 0.0])
    )
    a = torch.linalg.cross(axis, helper)
    a = a / torch.linalg.vector_norm(a)
    b = torch.linalg.cross(axis, a)
    uv = torch.stack([dot(p, a.expand_as(p)), dot(p, b.expand_as(p))], -1)
    uv = uv - torch.floor(uv)
    img = load_photo(tex.image)
    grid = (2.0 * uv - 1.0)[None, None]  # (1, 1, M, 2), x = column
    out = F.grid_sample(img[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, :, 0].T.contiguous()


def evaluate_texture(tex: Texture, points: Tensor) -> Tensor:
    """Albedo of `tex` at points (M, 3) float32 (object or surface coordinates) -> (M, 3) in
    [0, 1]."""
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (M, 3), got {tuple(points.shape)}")
    if points.shape[0] == 0:
        return torch.zeros(0, 3)
    p = points * tex.frequency + _phase(tex)
    direction = torch.tensor(tex.direction)
    if tex.kind == "checker":
        parity = torch.floor(p).long().sum(-1) % 2
        out = _blend(tex, parity.to(torch.float32))
    elif tex.kind == "stripes":
        t = dot(p, direction.expand_as(p))
        out = _blend(tex, ((t - torch.floor(t)) < 0.5).to(torch.float32))
    elif tex.kind == "gradient":
        t = dot(p, direction.expand_as(p))
        out = _blend(tex, torch.abs(2.0 * (t / 2.0 - torch.floor(t / 2.0)) - 1.0))
    elif tex.kind == "noise":
        out = _blend(tex, _value_noise(p, tex.seed, tex.octaves))
    elif tex.kind == "voronoi":
        out = _voronoi(tex, p)
    else:
        out = _photo(tex, p)
    return out.clamp(0.0, 1.0)
