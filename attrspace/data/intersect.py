"""Ray intersection with the scene's primitives and its room, vectorised over rays.

Rays are (origins (N, 3), directions (N, 3)), float32; directions need not be unit length, and the
returned ray parameter t gives the hit at o + t d (inf where there is none). Each primitive is
intersected in its local unit frame, where an affine map keeps t unchanged: spheres, boxes and
cylinders in closed form, tori and superquadrics by sampling their implicit function along the part
of the ray inside the bounding box, then bisecting the first sign change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attrspace.data.cameras import rotation_matrix
from attrspace.data.scene import Primitive

_IMPLICIT_SAMPLES = 40
_BISECTIONS = 12
_FD_STEP = 1e-3


@dataclass(frozen=True)
class PlacedPrimitive:
    """A primitive with its frame as tensors: world = rot @ (scale * local) + center."""

    kind: str
    rot: Tensor  # (3, 3) float32, object-to-world
    center: Tensor  # (3,)
    scale: Tensor  # (3,)
    shape: tuple[float, ...]
    bound: float  # radius of a sphere about `center` that holds the whole shape

    @classmethod
    def from_spec(cls, p: Primitive) -> PlacedPrimitive:
        rot = rotation_matrix(p.rotation).to(torch.float32)
        bound = 1.001 * sum(s * s for s in p.scale) ** 0.5  # the unit shapes fit in [-1, 1]^3
        return cls(p.kind, rot, torch.tensor(p.center), torch.tensor(p.scale), p.shape, bound)

    def to_local(self, points: Tensor) -> Tensor:
        """World points (N, 3) -> local unit-frame points (N, 3)."""
        return rowmul(points - self.center, self.rot) / self.scale

    def object_coords(self, points: Tensor) -> Tensor:
        """World points (N, 3) -> rotated, unscaled object coordinates (N, 3) (texture space)."""
        return rowmul(points - self.center, self.rot)


def pow_(t: Tensor, exponent: float | Tensor) -> Tensor:
    """t ** exponent for t >= 0 (0 ** positive = 0), as exp(exponent * log t): torch's CPU pow
    computes the elements that do not fill a whole SIMD vector another way, so its result for one
    ray would depend on the ray's position in the batch; exp and log gave bit-identical results at
    every offset and thread count tried (tests/data/test_render.py checks a render's bytes do not
    change with chunking)."""
    return torch.exp(torch.log(t) * exponent)


def rowmul(v: Tensor, m: Tensor) -> Tensor:
    """v @ m for row vectors v (N, 3) and m (3, 3), written out so that each row's result does not
    depend on N (a BLAS matmul may pick a different summation order for another batch size, and the
    renders must not change with how views are chunked)."""
    return v[:, 0:1] * m[0] + v[:, 1:2] * m[1] + v[:, 2:3] * m[2]


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product of (N, 3) tensors -> (N,); written out because a sum over a
    length-3 dim is several times slower on the CPU than three products."""
    return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def _first_positive(cands: Tensor, t_min: float) -> Tensor:
    """Smallest candidate (N, C) above t_min per row -> (N,), inf where none."""
    inf = torch.full_like(cands, float("inf"))
    return torch.where(cands > t_min, cands, inf).min(1).values


def _safe(d: Tensor) -> Tensor:
    """Replace (near) zero direction components so that 1 / d is a large finite number, not NaN."""
    tiny = torch.full_like(d, 1e-12)
    return torch.where(d.abs() < 1e-12, torch.where(d < 0, -tiny, tiny), d)


def _slab(o: Tensor, d: Tensor, half: Tensor) -> tuple[Tensor, Tensor]:
    """Entry and exit t of rays (N, 3) through the box |x_i| <= half_i."""
    inv = 1.0 / _safe(d)
    t0 = (-half - o) * inv
    t1 = (half - o) * inv
    return torch.minimum(t0, t1).max(1).values, torch.maximum(t0, t1).min(1).values


def _sphere(o: Tensor, d: Tensor, t_min: float) -> Tensor:
    a = dot(d, d)
    b = dot(o, d)
    c = dot(o, o) - 1.0
    disc = b * b - a * c
    sq = torch.sqrt(disc.clamp_min(0.0))
    t = _first_positive(torch.stack([(-b - sq) / a, (-b + sq) / a], 1), t_min)
    return torch.where(disc >= 0, t, torch.full_like(t, float("inf")))


def _box(o: Tensor, d: Tensor, t_min: float) -> Tensor:
    tn, tf = _slab(o, d, torch.ones(3))
    t = _first_positive(torch.stack([tn, tf], 1), t_min)
    return torch.where(tn <= tf, t, torch.full_like(t, float("inf")))


def _cylinder(o: Tensor, d: Tensor, t_min: float) -> Tensor:
    inf = float("inf")
    a = (d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]).clamp_min(1e-20)
    b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
    c = o[:, 0] * o[:, 0] + o[:, 1] * o[:, 1] - 1.0
    disc = b * b - a * c
    sq = torch.sqrt(disc.clamp_min(0.0))
    side = torch.stack([(-b - sq) / a, (-b + sq) / a], 1)
    side_z = o[:, 2:3] + side * d[:, 2:3]
    side = torch.where((disc[:, None] >= 0) & (side_z.abs() <= 1.0), side, inf)
    dz = _safe(d[:, 2:3])
    caps = torch.cat([(1.0 - o[:, 2:3]) / dz, (-1.0 - o[:, 2:3]) / dz], 1)
    cap_x = o[:, None, 0] + caps * d[:, None, 0]
    cap_y = o[:, None, 1] + caps * d[:, None, 1]
    cap_r2 = cap_x * cap_x + cap_y * cap_y
    caps = torch.where(cap_r2 <= 1.0, caps, inf)
    return _first_positive(torch.cat([side, caps], 1), t_min)


def implicit_value(kind: str, shape: tuple[float, ...], p: Tensor) -> Tensor:
    """Implicit function of a unit torus / superquadric at local points (..., 3); <= 0 inside."""
    x, y, z = p.unbind(-1)
    if kind == "torus":
        minor = shape[0]
        major = 1.0 - minor
        q = x * x + y * y + z * z + major * major - minor * minor
        return q * q - 4.0 * major * major * (x * x + y * y)
    e1, e2 = shape
    xy = pow_(x.abs(), 2.0 / e2) + pow_(y.abs(), 2.0 / e2)
    return pow_(xy, e2 / e1) + pow_(z.abs(), 2.0 / e1) - 1.0


def _implicit(kind: str, shape: tuple[float, ...], o: Tensor, d: Tensor, t_min: float) -> Tensor:
    half = torch.tensor([1.0, 1.0, shape[0] if kind == "torus" else 1.0])
    tn, tf = _slab(o, d, half)
    tn = tn.clamp_min(t_min)
    t = torch.full((o.shape[0],), float("inf"))
    idx = torch.nonzero(tn < tf).squeeze(1)
    if idx.numel() == 0:
        return t
    o, d, tn, tf = o[idx], d[idx], tn[idx], tf[idx]
    steps = torch.linspace(0.0, 1.0, _IMPLICIT_SAMPLES)
    ts = tn[:, None] + (tf - tn)[:, None] * steps  # (M, K)
    inside = implicit_value(kind, shape, o[:, None, :] + ts[..., None] * d[:, None, :]) <= 0.0
    has = inside.any(1)
    first = inside.to(torch.uint8).argmax(1)
    hi = ts.gather(1, first[:, None])[:, 0]
    lo = ts.gather(1, (first - 1).clamp_min(0)[:, None])[:, 0]
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        in_mid = implicit_value(kind, shape, o + mid[:, None] * d) <= 0.0
        hi = torch.where(in_mid, mid, hi)
        lo = torch.where(in_mid, lo, mid)
    t[idx] = torch.where(has, hi, torch.full_like(hi, float("inf")))
    return t


def _may_hit(prim: PlacedPrimitive, origins: Tensor, dirs: Tensor, t_min: float) -> Tensor:
    """Indices of the rays that meet the primitive's bounding sphere ahead of t_min (a cheap cull:
    most rays miss most primitives, and the exact tests cost several times more)."""
    oc = origins - prim.center
    a = dot(dirs, dirs)
    b = dot(oc, dirs)
    c = dot(oc, oc) - prim.bound * prim.bound
    disc = b * b - a * c
    far = -b + torch.sqrt(disc.clamp_min(0.0))
    return torch.nonzero((disc >= 0) & (far > t_min * a)).squeeze(1)


def intersect(prim: PlacedPrimitive, origins: Tensor, dirs: Tensor, t_min: float = 1e-4) -> Tensor:
    """Nearest hit parameter t (N,) of rays (N, 3) with the primitive, inf where the ray misses."""
    t = torch.full((origins.shape[0],), float("inf"))
    idx = _may_hit(prim, origins, dirs, t_min)
    if idx.numel() == 0:
        return t
    o = prim.to_local(origins[idx])
    d = rowmul(dirs[idx], prim.rot) / prim.scale
    if prim.kind == "sphere":
        t[idx] = _sphere(o, d, t_min)
    elif prim.kind == "box":
        t[idx] = _box(o, d, t_min)
    elif prim.kind == "cylinder":
        t[idx] = _cylinder(o, d, t_min)
    else:
        t[idx] = _implicit(prim.kind, prim.shape, o, d, t_min)
    return t


def local_normals(prim: PlacedPrimitive, p: Tensor) -> Tensor:
    """Outward normals (not unit) at local surface points (M, 3) of the unit shape."""
    if prim.kind == "sphere":
        return p
    if prim.kind == "box":
        axis = p.abs().argmax(1)
        return torch.nn.functional.one_hot(axis, 3).to(p.dtype) * torch.sign(p)
    if prim.kind == "cylinder":
        cap = p[:, 2].abs() >= 1.0 - 1e-4
        side = torch.stack([p[:, 0], p[:, 1], torch.zeros_like(p[:, 0])], 1)
        top = torch.stack(
            [torch.zeros_like(p[:, 0]), torch.zeros_like(p[:, 0]), torch.sign(p[:, 2])], 1
        )
        return torch.where(cap[:, None], top, side)
    # implicit shapes: central differences of the implicit function
    eye = torch.eye(3) * _FD_STEP
    plus = implicit_value(prim.kind, prim.shape, p[:, None, :] + eye)
    minus = implicit_value(prim.kind, prim.shape, p[:, None, :] - eye)
    return plus - minus


def world_normals(prim: PlacedPrimitive, points: Tensor) -> Tensor:
    """Unit outward normals (M, 3) at world surface points (M, 3) of the primitive.

    Normals map with the inverse transpose of the object-to-world map: rot @ (n_local / scale)."""
    n = rowmul(local_normals(prim, prim.to_local(points)) / prim.scale, prim.rot.T)
    return torch.nn.functional.normalize(n, dim=1)


def intersect_room(
    origins: Tensor, dirs: Tensor, half: float, height: float
) -> tuple[Tensor, Tensor]:
    """Rays from inside the room's footprint -> (t (N,), surface id (N,) int64).

    Surface ids: 0 floor, 1 wall at x = +-half, 2 wall at y = +-half, -1 background (the ray leaves
    through the open top, or passes over a wall; t = inf there)."""
    inf = torch.full((origins.shape[0],), float("inf"))
    d = _safe(dirs)
    tx = torch.where(d[:, 0] > 0, half - origins[:, 0], -half - origins[:, 0]) / d[:, 0]
    ty = torch.where(d[:, 1] > 0, half - origins[:, 1], -half - origins[:, 1]) / d[:, 1]
    tz = torch.where(dirs[:, 2] < 0, -origins[:, 2] / d[:, 2], inf)
    t_wall = torch.minimum(tx, ty)
    wall_id = torch.where(tx <= ty, 1, 2)
    wall_z = origins[:, 2] + t_wall * dirs[:, 2]
    floor = tz <= t_wall
    wall = ~floor & (wall_z <= height)
    t = torch.where(floor, tz, torch.where(wall, t_wall, inf))
    ids = torch.where(floor, 0, torch.where(wall, wall_id, -1))
    return t, ids
