"""Seeded draws of every scene attribute from a numpy Generator.

Each attribute is drawn from a "style": a small JSON-friendly dict of ranges and choices. A family
dataset draws one style for its varying attribute (so the datasets of a family differ in how that
attribute is distributed, as the paper's per-dataset seeds and configurations do) and uses the broad
DEFAULT_STYLES for the attributes it holds fixed.

Geometry and cameras never collide by construction: every primitive's bounding sphere lies inside
the "clear zone" (horizontal radius CLEAR_RADIUS, height CLEAR_HEIGHT) and every camera lies outside
it.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

from attrspace.data.scene import (
    Appearance,
    CameraRig,
    Geometry,
    Light,
    Lighting,
    Material,
    Primitive,
    Texture,
)
from attrspace.data.textures import PHOTO_NAMES

CLEAR_RADIUS = 2.2
CLEAR_HEIGHT = 2.2
N_MATERIALS = 8  # object materials per scene; at most 8 primitives, so each wears its own
PROCEDURAL_KINDS = ("checker", "stripes", "noise", "voronoi", "gradient")
MINING_RIGS = ("orbit", "forward", "random")

DEFAULT_STYLES: dict[str, dict] = {
    "geometry": {
        "kinds": ["sphere", "box", "cylinder", "torus", "superquadric"],
        "count": [2, 6],
        "size": [0.25, 0.5],
    },
    "texture": {
        "kinds": list(PROCEDURAL_KINDS),
        "hue": 0.0,
        "hue_spread": 0.5,
        "frequency": [1.0, 4.0],
        "specular": [0.0, 0.5],
    },
    "camera": {
        "kind": "orbit",
        "fov_deg": [45.0, 70.0],
        "radius": [3.0, 3.6],
        "elevation_deg": [10.0, 45.0],
        "span_deg": [30.0, 90.0],
    },
    "lighting": {
        "kinds": ["directional", "point"],
        "count": [1, 3],
        "saturation": 0.3,
        "intensity": [0.6, 1.2],
        "elevation_deg": [25.0, 75.0],
        "ambient": [0.08, 0.2],
    },
}


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _unit(rng: np.random.Generator) -> tuple[float, float, float]:
    v = rng.normal(size=3)
    v = v / np.linalg.norm(v)
    return (float(v[0]), float(v[1]), float(v[2]))


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (float(r), float(g), float(b))


def draw_style(attribute: str, rng: np.random.Generator) -> dict:
    """A dataset-level style for the varying attribute: a narrower slice of the default style."""
    if attribute == "geometry":
        kinds = DEFAULT_STYLES["geometry"]["kinds"]
        lo = int(rng.integers(1, 5))
        return {
            "kinds": sorted(
                rng.choice(kinds, size=int(rng.integers(2, 4)), replace=False).tolist()
            ),
            "count": [lo, lo + int(rng.integers(1, 4))],
            "size": [0.2 + 0.1 * _u(rng, 0, 1), 0.5],
        }
    if attribute == "texture":
        kinds = sorted(
            rng.choice(PROCEDURAL_KINDS, size=int(rng.integers(2, 4)), replace=False).tolist()
        )
        f = _u(rng, 1.0, 3.0)
        return {
            "kinds": kinds,
            "hue": _u(rng, 0.0, 1.0),
            "hue_spread": _u(rng, 0.05, 0.25),
            "frequency": [f, 1.5 * f],
            "specular": [0.0, _u(rng, 0.1, 0.6)],
        }
    if attribute == "camera":
        el = _u(rng, 10.0, 30.0)
        return {
            "kind": str(rng.choice(MINING_RIGS)),
            "fov_deg": [45.0, 70.0],
            "radius": [3.0, 3.6],
            "elevation_deg": [el, el + 20.0],
            "span_deg": [20.0, _u(rng, 40.0, 100.0)],
        }
    if attribute == "lighting":
        lo = int(rng.integers(1, 3))
        kinds = [["directional"], ["point"], ["directional", "point"]][int(rng.integers(0, 3))]
        return {
            "kinds": kinds,
            "count": [lo, lo + 1],
            "saturation": _u(rng, 0.0, 0.4),
            "intensity": [0.5, _u(rng, 0.8, 1.4)],
            "elevation_deg": [20.0, _u(rng, 40.0, 80.0)],
            "ambient": [0.05, _u(rng, 0.1, 0.25)],
        }
    raise ValueError(f"unknown attribute {attribute!r}")


def draw_geometry(rng: np.random.Generator, style: dict) -> Geometry:
    """Primitives whose bounding spheres stay inside the clear zone; a room of half extent 4.4-6."""
    prims = []
    for _ in range(int(rng.integers(style["count"][0], style["count"][1] + 1))):
        kind = str(rng.choice(style["kinds"]))
        size = _u(rng, *style["size"])
        scale = tuple(float(size * a) for a in rng.uniform(0.7, 1.3, size=3))
        bound = float(np.linalg.norm(scale))
        reach = max(0.0, min(1.5, CLEAR_RADIUS - bound))
        r, phi = reach * math.sqrt(_u(rng, 0, 1)), _u(rng, -math.pi, math.pi)
        z = _u(rng, 0.4 * bound, max(0.4 * bound, min(1.2 * bound, CLEAR_HEIGHT - bound)))
        axis, angle = _unit(rng), _u(rng, 0.0, math.pi)
        shape: tuple[float, ...] = ()
        if kind == "torus":
            shape = (_u(rng, 0.2, 0.45),)
        elif kind == "superquadric":
            shape = (_u(rng, 0.3, 1.5), _u(rng, 0.3, 1.5))
        prims.append(
            Primitive(
                kind=kind,
                center=(r * math.cos(phi), r * math.sin(phi), z),
                rotation=tuple(float(angle * a) for a in axis),  # type: ignore[arg-type]
                scale=scale,  # type: ignore[arg-type]
                shape=shape,
            )
        )
    return Geometry(tuple(prims), _u(rng, 4.4, 6.0), _u(rng, 1.5, 3.5))


def draw_texture(rng: np.random.Generator, style: dict, frequency_scale: float = 1.0) -> Texture:
    kind = str(rng.choice(style["kinds"]))
    n_colors = int(rng.integers(2, 5))
    colors = tuple(
        _hsv(
            style["hue"] + _u(rng, -1, 1) * style["hue_spread"],
            _u(rng, 0.2, 0.9),
            _u(rng, 0.3, 1.0),
        )
        for _ in range(n_colors)
    )
    return Texture(
        kind=kind,
        colors=colors,
        frequency=_u(rng, *style["frequency"]) * frequency_scale,
        direction=(0.0, 0.0, 1.0) if kind == "photo" else _unit(rng),
        seed=int(rng.integers(0, 2**31)),
        octaves=int(rng.integers(1, 5)),
        image=str(rng.choice(PHOTO_NAMES)) if kind == "photo" else "",
    )


def draw_material(rng: np.random.Generator, style: dict, frequency_scale: float = 1.0) -> Material:
    texture = draw_texture(rng, style, frequency_scale)
    return Material(
        texture, _u(rng, *style["specular"]), float(np.exp(rng.uniform(np.log(8), np.log(256))))
    )


def draw_appearance(
    rng: np.random.Generator, style: dict, room_style: dict | None = None
) -> Appearance:
    """Object materials from `style`; floor and walls (coarser) from room_style or style."""
    objects = tuple(draw_material(rng, style) for _ in range(N_MATERIALS))
    room = room_style or style
    return Appearance(objects, draw_material(rng, room, 0.5), draw_material(rng, room, 0.3))


def _outside_clear_zone(eye: np.ndarray) -> bool:
    return bool(math.hypot(eye[0], eye[1]) > CLEAR_RADIUS + 0.1 or eye[2] > CLEAR_HEIGHT + 0.1)


def _eye(target: tuple, radius: float, az: float, el: float) -> np.ndarray:
    a, e = math.radians(az), math.radians(el)
    return np.asarray(target) + radius * np.array(
        [math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)]
    )


def _rig_eyes(rig: CameraRig) -> list[np.ndarray]:
    base = _eye(rig.target, rig.radius, rig.azimuth_deg, rig.elevation_deg)
    if rig.kind == "orbit":
        fracs = [k / max(rig.views - 1, 1) for k in range(rig.views)]
        return [
            _eye(
                rig.target,
                rig.radius,
                rig.azimuth_deg + rig.azimuth_span_deg * f,
                rig.elevation_deg,
            )
            for f in fracs
        ]
    if rig.kind == "forward":
        heading = (np.asarray(rig.target) - base) / rig.radius
        return [base + k * rig.step * heading for k in range(rig.views)]
    if rig.kind == "random":
        return [
            _eye(tuple(np.asarray(rig.target) + row[3:]), row[2], row[0], row[1])
            for row in rig.per_view
        ]
    return [base + np.asarray(row[:3]) for row in rig.per_view]


def draw_camera(rng: np.random.Generator, views: int, style: dict) -> CameraRig:
    """A rig of style["kind"] whose eyes all lie outside the clear zone (redrawn until they do)."""
    kind = style["kind"]
    for _ in range(1000):
        target = (_u(rng, -0.3, 0.3), _u(rng, -0.3, 0.3), _u(rng, 0.3, 0.8))
        common = {
            "kind": kind,
            "views": views,
            "fov_deg": _u(rng, *style["fov_deg"]),
            "target": target,
            "radius": _u(rng, *style["radius"]),
            "elevation_deg": _u(rng, *style["elevation_deg"]),
            "azimuth_deg": _u(rng, -180.0, 180.0),
        }
        span = _u(rng, *style["span_deg"])
        if kind == "orbit":
            rig = CameraRig(**common, azimuth_span_deg=span * float(rng.choice([-1.0, 1.0])))
        elif kind == "forward":
            rig = CameraRig(**common, step=common["radius"] * _u(rng, 0.1, 0.3) / max(views - 1, 1))
        elif kind == "random":
            rows = tuple(
                (
                    common["azimuth_deg"] + _u(rng, -span / 2, span / 2),
                    _u(rng, *style["elevation_deg"]),
                    _u(rng, *style["radius"]),
                    _u(rng, -0.3, 0.3),
                    _u(rng, -0.3, 0.3),
                    _u(rng, -0.2, 0.2),
                )
                for _ in range(views)
            )
            rig = CameraRig(**common, per_view=rows)
        elif kind == "handheld":
            rig = CameraRig(
                **common, per_view=_hand_jitter(rng, views, style["walk_step"], style["turn_deg"])
            )
        else:
            raise ValueError(f"unknown camera rig kind {kind!r}")
        if all(_outside_clear_zone(e) for e in _rig_eyes(rig)):
            return rig
    raise RuntimeError(
        f"could not place a {kind} rig outside the clear zone; check the style {style}"
    )


def _hand_jitter(rng: np.random.Generator, views: int, step: float, turn: float) -> tuple:
    """A random walk of eye offsets (world units) and small turns (degrees), one row per view."""
    pos, ang, rows = np.zeros(3), np.zeros(3), []
    for _ in range(views):
        rows.append(tuple(float(x) for x in (*pos, *ang)))
        pos = pos + rng.uniform(-step, step, size=3)
        ang = ang + rng.uniform(-turn, turn, size=3)
    return tuple(rows)


def draw_lighting(rng: np.random.Generator, style: dict) -> Lighting:
    """Directional and point lights (point lights above the clear zone), ambient, background."""
    lights = []
    n = int(rng.integers(style["count"][0], style["count"][1] + 1))
    for _ in range(n):
        kind = str(rng.choice(style["kinds"]))
        color = _hsv(_u(rng, 0, 1), _u(rng, 0.0, style["saturation"]), 1.0)
        power = _u(rng, *style["intensity"]) / math.sqrt(n)
        az = _u(rng, -180.0, 180.0)
        if kind == "directional":
            el = math.radians(_u(rng, *style["elevation_deg"]))
            a = math.radians(az)
            vec = (math.cos(el) * math.cos(a), math.cos(el) * math.sin(a), math.sin(el))
            lights.append(Light("directional", vec, color, power))
        else:
            r, h = _u(rng, 1.0, 3.0), _u(rng, CLEAR_HEIGHT + 0.3, 3.5)
            pos = (r * math.cos(math.radians(az)), r * math.sin(math.radians(az)), h)
            lights.append(Light("point", pos, color, power * float(sum(x * x for x in pos))))
    grey = _u(rng, *style["ambient"])
    ambient = _hsv(_u(rng, 0, 1), _u(rng, 0.0, 0.2), grey)
    background = _hsv(_u(rng, 0.5, 0.7), _u(rng, 0.1, 0.5), _u(rng, 0.6, 1.0))
    return Lighting(tuple(lights), ambient, background)


def draw_unusual_lighting(rng: np.random.Generator) -> Lighting:
    """Held-out lighting: grazing sun, saturated coloured lamps, near darkness or overexposure."""
    mode = str(rng.choice(["grazing", "coloured", "dim", "overexposed"]))
    base = draw_lighting(rng, DEFAULT_STYLES["lighting"])
    if mode == "grazing":
        a, e = math.radians(_u(rng, -180, 180)), math.radians(_u(rng, 2.0, 8.0))
        vec = (math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e))
        lights = (Light("directional", vec, _hsv(_u(rng, 0.0, 0.15), 0.6, 1.0), _u(rng, 1.5, 2.5)),)
        return Lighting(lights, (0.01, 0.01, 0.02), base.background)
    if mode == "coloured":
        lights = []
        for k in range(3):
            az = math.radians(120.0 * k + _u(rng, -30, 30))
            pos = (3.0 * math.cos(az), 3.0 * math.sin(az), _u(rng, 0.3, 1.0))
            color = _hsv(k / 3.0 + _u(rng, -0.05, 0.05), _u(rng, 0.85, 1.0), 1.0)
            lights.append(Light("point", pos, color, _u(rng, 8.0, 14.0)))
        return Lighting(tuple(lights), (0.0, 0.0, 0.0), base.background)
    if mode == "dim":
        return Lighting(
            tuple(Light(x.kind, x.vector, x.color, x.intensity * 0.15) for x in base.lights),
            (0.01, 0.01, 0.01),
            base.background,
        )
    return Lighting(
        tuple(
            Light(x.kind, x.vector, x.color, x.intensity * _u(rng, 3.0, 5.0)) for x in base.lights
        ),
        base.ambient,
        base.background,
    )
