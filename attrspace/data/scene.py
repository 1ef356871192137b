"""Scene descriptions: frozen dataclasses that fully determine a multi-view render.

A scene has four attributes, one dataclass each, named as the attribute families are:
``geometry`` (primitives in a room), ``texture`` (materials), ``camera`` (a rig of S views) and
``lighting``. Every value is a plain Python number, string or tuple, so ``to_json`` / ``from_json``
round-trip exactly (floats are written with ``repr`` precision) and two specs compare field by
field.

World frame: z up, floor at z = 0, the room spans [-L, L] x [-L, L] x [0, wall_height] without a
ceiling (rays leaving through the top see the background and are invalid).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

Vec3 = tuple[float, float, float]

ATTRIBUTES = ("texture", "geometry", "camera", "lighting")
PRIMITIVE_KINDS = ("sphere", "box", "cylinder", "torus", "superquadric")
TEXTURE_KINDS = ("checker", "stripes", "noise", "voronoi", "gradient", "photo")
RIG_KINDS = ("orbit", "forward", "random", "handheld")
LIGHT_KINDS = ("directional", "point")

# Number of numbers stored per view by the rigs that store explicit per-view draws.
PER_VIEW_LEN = {"random": 6, "handheld": 6}
SHAPE_LEN = {"sphere": 0, "box": 0, "cylinder": 0, "torus": 1, "superquadric": 2}


def _fail(cls: str, msg: str) -> None:
    raise ValueError(f"{cls}: {msg}")


def _check_vec3(cls: str, name: str, v: Any, lo: float = -math.inf, hi: float = math.inf) -> None:
    if not (isinstance(v, tuple) and len(v) == 3 and all(isinstance(x, float) for x in v)):
        _fail(cls, f"{name} must be a tuple of 3 floats, got {v!r}")
    if not all(lo <= x <= hi for x in v):
        _fail(cls, f"{name} must lie in [{lo}, {hi}], got {v!r}")


def _check_float(cls: str, name: str, v: Any, lo: float, hi: float) -> None:
    if not isinstance(v, float) or not (lo <= v <= hi):
        _fail(cls, f"{name} must be a float in [{lo}, {hi}], got {v!r}")


def _check_kind(cls: str, kind: Any, allowed: tuple[str, ...]) -> None:
    if kind not in allowed:
        _fail(cls, f"kind must be one of {allowed}, got {kind!r}")


@dataclass(frozen=True)
class Texture:
    """A procedural albedo pattern, evaluated at 3D points (solid texture).

    colors: 2 to 4 RGB colours in [0, 1] (checker/stripes/gradient/noise blend the first two;
    voronoi picks one per cell; photo ignores them). frequency: pattern cycles per world unit.
    direction: unit axis of stripes / gradients. seed: hash seed of noise / voronoi.
    octaves: fractal octaves of noise. image: scikit-image data name, photo only.
    """

    kind: str
    colors: tuple[Vec3, ...]
    frequency: float
    direction: Vec3 = (1.0, 0.0, 0.0)
    seed: int = 0
    octaves: int = 1
    image: str = ""

    def __post_init__(self) -> None:
        _check_kind("Texture", self.kind, TEXTURE_KINDS)
        if not (isinstance(self.colors, tuple) and 2 <= len(self.colors) <= 4):
            _fail("Texture", f"colors must be a tuple of 2 to 4 RGB tuples, got {self.colors!r}")
        for c in self.colors:
            _check_vec3("Texture", "colors[i]", c, 0.0, 1.0)
        _check_float("Texture", "frequency", self.frequency, 1e-3, 1e3)
        _check_vec3("Texture", "direction", self.direction, -1.0, 1.0)
        if abs(sum(x * x for x in self.direction) - 1.0) > 1e-6:
            _fail("Texture", f"direction must be a unit vector, got {self.direction!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            _fail("Texture", f"seed must be an int in [0, 2**31), got {self.seed!r}")
        if not isinstance(self.octaves, int) or not 1 <= self.octaves <= 6:
            _fail("Texture", f"octaves must be an int in [1, 6], got {self.octaves!r}")
        if (self.kind == "photo") != bool(self.image):
            _fail("Texture", f"image is required for kind 'photo' only, got {self.image!r}")

    @classmethod
    def from_dict(cls, d: dict) -> Texture:
        _check_keys(cls, d)
        return cls(
            kind=d["kind"],
            colors=tuple(_vec3(c) for c in d["colors"]),
            frequency=float(d["frequency"]),
            direction=_vec3(d["direction"]),
            seed=d["seed"],
            octaves=d["octaves"],
            image=d["image"],
        )


@dataclass(frozen=True)
class Material:
    """A texture plus Blinn-Phong specularity (specular weight in [0, 1], exponent shininess)."""

    texture: Texture
    specular: float
    shininess: float

    def __post_init__(self) -> None:
        if not isinstance(self.texture, Texture):
            _fail("Material", f"texture must be a Texture, got {type(self.texture).__name__}")
        _check_float("Material", "specular", self.specular, 0.0, 1.0)
        _check_float("Material", "shininess", self.shininess, 1.0, 1024.0)

    @classmethod
    def from_dict(cls, d: dict) -> Material:
        _check_keys(cls, d)
        return cls(Texture.from_dict(d["texture"]), float(d["specular"]), float(d["shininess"]))


@dataclass(frozen=True)
class Primitive:
    """A unit shape scaled by `scale`, rotated by the rotation vector `rotation` (axis * angle,
    radians, object-to-world) and moved to `center`.

    Unit shapes in local coordinates: sphere |p| <= 1; box [-1, 1]^3; cylinder x^2 + y^2 <= 1,
    |z| <= 1; torus with tube radius shape[0] and centre-line radius 1 - shape[0] in the xy plane;
    superquadric (|x|^(2/e2) + |y|^(2/e2))^(e2/e1) + |z|^(2/e1) <= 1 with shape = (e1, e2).
    """

    kind: str
    center: Vec3
    rotation: Vec3
    scale: Vec3
    shape: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _check_kind("Primitive", self.kind, PRIMITIVE_KINDS)
        _check_vec3("Primitive", "center", self.center, -100.0, 100.0)
        _check_vec3("Primitive", "rotation", self.rotation, -2 * math.pi, 2 * math.pi)
        _check_vec3("Primitive", "scale", self.scale, 1e-3, 100.0)
        n = SHAPE_LEN[self.kind]
        if not (isinstance(self.shape, tuple) and len(self.shape) == n):
            _fail("Primitive", f"{self.kind} needs {n} shape values, got {self.shape!r}")
        if self.kind == "torus":
            _check_float("Primitive", "torus tube ratio", self.shape[0], 0.05, 0.5)
        if self.kind == "superquadric":
            for e in self.shape:
                _check_float("Primitive", "superquadric exponent", e, 0.2, 1.9)

    @classmethod
    def from_dict(cls, d: dict) -> Primitive:
        _check_keys(cls, d)
        return cls(
            kind=d["kind"],
            center=_vec3(d["center"]),
            rotation=_vec3(d["rotation"]),
            scale=_vec3(d["scale"]),
            shape=tuple(float(x) for x in d["shape"]),
        )


@dataclass(frozen=True)
class Geometry:
    """The primitives and the room around them (half extent L, wall height)."""

    primitives: tuple[Primitive, ...]
    room_half_extent: float
    wall_height: float

    def __post_init__(self) -> None:
        if not (isinstance(self.primitives, tuple) and self.primitives):
            _fail("Geometry", "primitives must be a non-empty tuple")
        if not all(isinstance(p, Primitive) for p in self.primitives):
            _fail("Geometry", "primitives must hold Primitive instances")
        _check_float("Geometry", "room_half_extent", self.room_half_extent, 1.0, 100.0)
        _check_float("Geometry", "wall_height", self.wall_height, 0.1, 100.0)

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        _check_keys(cls, d)
        prims = tuple(Primitive.from_dict(p) for p in d["primitives"])
        return cls(prims, float(d["room_half_extent"]), float(d["wall_height"]))


@dataclass(frozen=True)
class Appearance:
    """Materials: primitive i wears objects[i % len(objects)]; floor and walls have their own."""

    objects: tuple[Material, ...]
    floor: Material
    walls: Material

    def __post_init__(self) -> None:
        if not (isinstance(self.objects, tuple) and self.objects):
            _fail("Appearance", "objects must be a non-empty tuple of Material")
        if not all(isinstance(m, Material) for m in (*self.objects, self.floor, self.walls)):
            _fail("Appearance", "objects, floor and walls must be Material instances")

    @classmethod
    def from_dict(cls, d: dict) -> Appearance:
        _check_keys(cls, d)
        objects = tuple(Material.from_dict(m) for m in d["objects"])
        return cls(objects, Material.from_dict(d["floor"]), Material.from_dict(d["walls"]))


@dataclass(frozen=True)
class CameraRig:
    """A trajectory of `views` pinhole cameras with horizontal field of view `fov_deg`.

    The base eye sits at `target` + radius * (cos el cos az, cos el sin az, sin el).
    - orbit: view k at azimuth azimuth_deg + azimuth_span_deg * k / (views - 1), looking at target.
    - forward: every view looks along the base eye -> target direction; view k moves k * step
      along it.
    - random: per_view[k] = (azimuth_deg, elevation_deg, radius, target jitter x, y, z).
    - handheld: base pose looking at target; per_view[k] = (eye offset x, y, z in world units,
      rotation about the camera's x, y, z axes in degrees).
    """

    kind: str
    views: int
    fov_deg: float
    target: Vec3
    radius: float
    elevation_deg: float
    azimuth_deg: float
    azimuth_span_deg: float = 0.0
    step: float = 0.0
    per_view: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        _check_kind("CameraRig", self.kind, RIG_KINDS)
        if not isinstance(self.views, int) or not 1 <= self.views <= 1024:
            _fail("CameraRig", f"views must be an int in [1, 1024], got {self.views!r}")
        _check_float("CameraRig", "fov_deg", self.fov_deg, 5.0, 150.0)
        _check_vec3("CameraRig", "target", self.target, -100.0, 100.0)
        _check_float("CameraRig", "radius", self.radius, 1e-3, 100.0)
        _check_float("CameraRig", "elevation_deg", self.elevation_deg, -89.0, 89.0)
        _check_float("CameraRig", "azimuth_deg", self.azimuth_deg, -720.0, 720.0)
        _check_float("CameraRig", "azimuth_span_deg", self.azimuth_span_deg, -360.0, 360.0)
        _check_float("CameraRig", "step", self.step, 0.0, 10.0)
        n = PER_VIEW_LEN.get(self.kind, 0)
        want = self.views if n else 0
        if not (isinstance(self.per_view, tuple) and len(self.per_view) == want):
            _fail(
                "CameraRig", f"{self.kind} needs {want} per_view entries, got {len(self.per_view)}"
            )
        for row in self.per_view:
            if not (
                isinstance(row, tuple) and len(row) == n and all(isinstance(x, float) for x in row)
            ):
                _fail("CameraRig", f"{self.kind} per_view rows must be {n} floats, got {row!r}")

    @classmethod
    def from_dict(cls, d: dict) -> CameraRig:
        _check_keys(cls, d)
        return cls(
            kind=d["kind"],
            views=d["views"],
            fov_deg=float(d["fov_deg"]),
            target=_vec3(d["target"]),
            radius=float(d["radius"]),
            elevation_deg=float(d["elevation_deg"]),
            azimuth_deg=float(d["azimuth_deg"]),
            azimuth_span_deg=float(d["azimuth_span_deg"]),
            step=float(d["step"]),
            per_view=tuple(tuple(float(x) for x in row) for row in d["per_view"]),
        )


@dataclass(frozen=True)
class Light:
    """directional: `vector` is the unit direction towards the light; point: its position.
    Irradiance is color * intensity (directional) or color * intensity / distance^2 (point)."""

    kind: str
    vector: Vec3
    color: Vec3
    intensity: float

    def __post_init__(self) -> None:
        _check_kind("Light", self.kind, LIGHT_KINDS)
        _check_vec3("Light", "vector", self.vector, -100.0, 100.0)
        if self.kind == "directional" and abs(sum(x * x for x in self.vector) - 1.0) > 1e-6:
            _fail("Light", f"a directional light needs a unit vector, got {self.vector!r}")
        _check_vec3("Light", "color", self.color, 0.0, 1.0)
        _check_float("Light", "intensity", self.intensity, 0.0, 1000.0)

    @classmethod
    def from_dict(cls, d: dict) -> Light:
        _check_keys(cls, d)
        return cls(d["kind"], _vec3(d["vector"]), _vec3(d["color"]), float(d["intensity"]))


@dataclass(frozen=True)
class Lighting:
    """Lights (possibly none), an ambient RGB term and the colour of pixels that hit nothing."""

    lights: tuple[Light, ...]
    ambient: Vec3
    background: Vec3

    def __post_init__(self) -> None:
        if not (isinstance(self.lights, tuple) and all(isinstance(x, Light) for x in self.lights)):
            _fail("Lighting", "lights must be a tuple of Light")
        _check_vec3("Lighting", "ambient", self.ambient, 0.0, 1.0)
        _check_vec3("Lighting", "background", self.background, 0.0, 1.0)

    @classmethod
    def from_dict(cls, d: dict) -> Lighting:
        _check_keys(cls, d)
        lights = tuple(Light.from_dict(x) for x in d["lights"])
        return cls(lights, _vec3(d["ambient"]), _vec3(d["background"]))


@dataclass(frozen=True)
class SceneSpec:
    """One sample: a scene seen by S cameras. Field names are the attribute names."""

    geometry: Geometry
    texture: Appearance
    camera: CameraRig
    lighting: Lighting

    def __post_init__(self) -> None:
        types = {
            "geometry": Geometry,
            "texture": Appearance,
            "camera": CameraRig,
            "lighting": Lighting,
        }
        for name, cls in types.items():
            if not isinstance(getattr(self, name), cls):
                _fail("SceneSpec", f"{name} must be a {cls.__name__}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> SceneSpec:
        _check_keys(cls, d)
        return cls(
            geometry=Geometry.from_dict(d["geometry"]),
            texture=Appearance.from_dict(d["texture"]),
            camera=CameraRig.from_dict(d["camera"]),
            lighting=Lighting.from_dict(d["lighting"]),
        )

    @classmethod
    def from_json(cls, text: str) -> SceneSpec:
        return cls.from_dict(json.loads(text))


def _vec3(v: Any) -> Vec3:
    if not (isinstance(v, (list, tuple)) and len(v) == 3):
        raise ValueError(f"expected 3 numbers, got {v!r}")
    return (float(v[0]), float(v[1]), float(v[2]))


def _check_keys(cls: type, d: Any) -> None:
    """Reject missing or unknown keys, so a stale or hand-edited spec is not silently accepted."""
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
    want = {f.name for f in fields(cls)}
    if set(d) != want:
        raise ValueError(
            f"{cls.__name__}: keys {sorted(d)} do not match the fields {sorted(want)} "
            f"(missing {sorted(want - set(d))}, unknown {sorted(set(d) - want)})"
        )
