"""The toy world's shape catalogue: 33 objects as exact signed distance functions with albedo.

The toy world is the embedded prior's whole universe: five primitives (sphere, cube, cylinder,
cone, torus) in six colours, plus three asymmetric objects with a front and a back (a snowman
whose nose points to +x, a chair facing +x, a mug with its handle on +y), which are what
exposes the Janus problem of score-distillation methods (DreamFusion, Poole et al. 2022).
The same definitions serve training-data generation, ground truth and evaluation, so every
number below is the one the issue states.

Frame: right-handed, +z up, azimuth 0 (+x) is the front; objects are centred at the origin.
Note: the issue says the objects lie inside the ball of radius 0.6, which is not quite true for
the cube (corner at 0.4*sqrt(3) = 0.693), the cylinder (rim at 0.602), the cone (base rim at
0.673) and the chair (back top corner at 0.695). Each object therefore carries its own exact
``bound_radius``; renderers must use it, not 0.6, or they clip corners.

SDFs are exact Euclidean distances for every primitive (sphere, box, capped cylinder, capped
cone, torus); a composite object is the union (min) of its parts, which is exact outside and a
lower bound inside, so it stays 1-Lipschitz and safe to sphere-trace. The albedo of a composite
at a point is that of the part nearest to it (smallest signed distance). Colours are sRGB albedo.
Everything is pure torch, batched over any leading shape, and keeps the dtype of the points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Colour name -> sRGB albedo of the primitives.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.10),
}
#: Fixed colours of the asymmetric objects.
WHITE = (0.95, 0.95, 0.95)
BROWN = (0.55, 0.35, 0.20)
NOSE_ORANGE = COLOURS["orange"]

PRIMITIVES = ("sphere", "cube", "cylinder", "cone", "torus")
ASYMMETRIC = ("snowman", "chair", "mug")

_AXES = {"x": 0, "y": 1, "z": 2}


# ---------------------------------------------------------------------------------------------
# Parts: exact SDFs of primitives in arbitrary (axis-aligned) placement


def _const(v: tuple[float, ...], like: Tensor) -> Tensor:
    return torch.tensor(v, dtype=like.dtype, device=like.device)


def _axial_radial(p: Tensor, centre: tuple[float, float, float], axis: str) -> tuple[Tensor, Tensor]:
    """Coordinates of ``p`` [..., 3] around an axis through ``centre``: (axial [...], radial [...])."""
    q = p - _const(centre, p)
    k = _AXES[axis]
    others = [i for i in range(3) if i != k]
    axial = q[..., k]
    radial = torch.sqrt(q[..., others[0]] ** 2 + q[..., others[1]] ** 2)
    return axial, radial


def _box2d(qx: Tensor, qy: Tensor) -> Tensor:
    """Signed distance given per-axis excesses ``|p| - half_size`` (2D or stacked N-D)."""
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    inside = torch.maximum(qx, qy).clamp(max=0)
    return outside + inside


def _segment_dist(px: Tensor, py: Tensor, ax: float, ay: float, bx: float, by: float) -> Tensor:
    """Unsigned distance from 2D points (px, py) to the segment a-b (b may equal a)."""
    dx, dy = bx - ax, by - ay
    len2 = dx * dx + dy * dy
    if len2 == 0.0:
        return torch.sqrt((px - ax) ** 2 + (py - ay) ** 2)
    t = (((px - ax) * dx + (py - ay) * dy) / len2).clamp(0.0, 1.0)
    return torch.sqrt((px - ax - t * dx) ** 2 + (py - ay - t * dy) ** 2)


@dataclass(frozen=True, eq=False)  # identity equality/hash: params hold a dict
class Part:
    """One primitive of an object: an exact SDF, an albedo, and whether it is the feature part."""

    kind: str
    params: dict
    rgb: tuple[float, float, float]
    feature: bool = False

    def sdf(self, p: Tensor) -> Tensor:  # [..., 3] -> [...]
        k, a = self.kind, self.params
        if k == "sphere":
            return torch.linalg.vector_norm(p - _const(a["centre"], p), dim=-1) - a["radius"]
        if k == "box":
            lo, hi = a["lo"], a["hi"]
            c = _const(tuple(0.5 * (l + h) for l, h in zip(lo, hi)), p)
            half = _const(tuple(0.5 * (h - l) for l, h in zip(lo, hi)), p)
            q = (p - c).abs() - half  # [..., 3]
            outside = torch.linalg.vector_norm(q.clamp(min=0), dim=-1)
            inside = q.amax(dim=-1).clamp(max=0)
            return outside + inside
        if k == "cylinder":
            axial, radial = _axial_radial(p, a["centre"], a["axis"])
            return _box2d(radial - a["radius"], axial.abs() - a["half_height"])
        if k == "cone":
            # Solid of revolution: the 3D distance is the 2D distance in the meridian half-plane
            # (radial >= 0) to the trapezoid (0,a0)-(r0,a0)-(r1,a1)-(0,a1); only the two caps and
            # the slanted side can be nearest, the axis itself is interior.
            axial, radial = _axial_radial(p, a["centre"], a["axis"])
            a0, a1, r0, r1 = a["a0"], a["a1"], a["r0"], a["r1"]
            d_base = _segment_dist(radial, axial, 0.0, a0, r0, a0)
            d_top = _segment_dist(radial, axial, 0.0, a1, r1, a1)
            d_side = _segment_dist(radial, axial, r0, a0, r1, a1)
            d = torch.minimum(torch.minimum(d_base, d_top), d_side)
            r_at = r0 + (r1 - r0) * (axial - a0) / (a1 - a0)
            inside = (axial >= a0) & (axial <= a1) & (radial <= r_at)
            return torch.where(inside, -d, d)
        if k == "torus":
            axial, radial = _axial_radial(p, a["centre"], a["axis"])
            return torch.sqrt((radial - a["major"]) ** 2 + axial**2) - a["minor"]
        raise ValueError(f"unknown part kind {k!r}")

    def bound_radius(self) -> float:
        """Radius of the smallest origin-centred ball holding the part (exact for these placements)."""
        k, a = self.kind, self.params
        if k == "sphere":
            return math.dist(a["centre"], (0, 0, 0)) + a["radius"]
        if k == "box":
            return math.sqrt(sum(max(abs(l), abs(h)) ** 2 for l, h in zip(a["lo"], a["hi"])))
        # Parts of revolution: the farthest point is on a rim circle (or the apex); sample the rims.
        c = a["centre"]
        if k == "cylinder":
            rims = [(-a["half_height"], a["radius"]), (a["half_height"], a["radius"])]
        elif k == "cone":
            rims = [(a["a0"], a["r0"]), (a["a1"], a["r1"])]
        else:  # torus: the tube's outer rim, sampled over the tube angle
            rims = [
                (a["minor"] * math.sin(t), a["major"] + a["minor"] * math.cos(t))
                for t in (2 * math.pi * i / 720 for i in range(721))
            ]
        # Around the axis the farthest point of a rim circle is on the side away from the axis
        # offset |c_perp|, so max |q| = sqrt((c_axial + off)^2 + (|c_perp| + r)^2).
        k_ax = _AXES[a["axis"]]
        c_perp = math.hypot(*[c[i] for i in range(3) if i != k_ax])
        return max(math.hypot(c[k_ax] + ax_off, c_perp + r) for ax_off, r in rims)


# ---------------------------------------------------------------------------------------------
# Objects


@dataclass(frozen=True, eq=False)
class ToyObject:
    """One catalogue object.

    ``name`` is its prompt ("a red sphere"), ``shape`` its shape word ("sphere", "snowman"),
    ``colour`` its colour word ("red"; "white" for the snowman and the mug, "brown" for the chair),
    ``rgb`` the sRGB albedo of that colour (the main body's colour for composites).
    """

    name: str
    shape: str
    colour: str
    rgb: tuple[float, float, float]
    parts: tuple[Part, ...]
    bound_radius: float = field(default=0.0)

    @property
    def prompt(self) -> str:
        return self.name

    @property
    def geometry_key(self) -> tuple:
        """Equal for objects with the same geometry (a shape in any colour): renderers trace them together."""
        return tuple((part.kind, tuple(sorted(part.params.items()))) for part in self.parts)

    @property
    def has_feature(self) -> bool:
        return any(part.feature for part in self.parts)

    def part_sdfs(self, points: Tensor) -> Tensor:
        """[..., 3] -> [..., n_parts] signed distance to each part."""
        return torch.stack([part.sdf(points) for part in self.parts], dim=-1)

    def sdf(self, points: Tensor) -> Tensor:
        """[..., 3] -> [...] signed distance (union of the parts)."""
        if len(self.parts) == 1:
            return self.parts[0].sdf(points)
        d = self.parts[0].sdf(points)
        for part in self.parts[1:]:
            d = torch.minimum(d, part.sdf(points))
        return d

    def nearest_part(self, points: Tensor) -> Tensor:
        """[..., 3] -> [...] long index of the part with the smallest signed distance."""
        if len(self.parts) == 1:
            return torch.zeros(points.shape[:-1], dtype=torch.long, device=points.device)
        return self.part_sdfs(points).argmin(dim=-1)

    def albedo(self, points: Tensor) -> Tensor:
        """[..., 3] -> [..., 3] sRGB albedo of the nearest part."""
        table = torch.tensor([part.rgb for part in self.parts], dtype=points.dtype, device=points.device)
        return table[self.nearest_part(points)]

    def feature_mask(self, points: Tensor) -> Tensor:
        """[..., 3] -> [...] bool: the nearest part is the feature (nose, chair back, handle).

        All False for objects without a feature (the primitives).
        """
        if not self.has_feature:
            return torch.zeros(points.shape[:-1], dtype=torch.bool, device=points.device)
        flags = torch.tensor([part.feature for part in self.parts], device=points.device)
        return flags[self.nearest_part(points)]


def _make(name: str, shape: str, colour: str, rgb: tuple[float, float, float], parts: list[Part]) -> ToyObject:
    bound = max(part.bound_radius() for part in parts)
    return ToyObject(name, shape, colour, rgb, tuple(parts), bound)


def _primitive_parts(shape: str, rgb: tuple[float, float, float]) -> list[Part]:
    o = (0.0, 0.0, 0.0)
    if shape == "sphere":
        return [Part("sphere", {"centre": o, "radius": 0.5}, rgb)]
    if shape == "cube":
        return [Part("box", {"lo": (-0.4, -0.4, -0.4), "hi": (0.4, 0.4, 0.4)}, rgb)]
    if shape == "cylinder":
        return [Part("cylinder", {"centre": o, "axis": "z", "radius": 0.4, "half_height": 0.45}, rgb)]
    if shape == "cone":
        return [Part("cone", {"centre": o, "axis": "z", "a0": -0.45, "a1": 0.45, "r0": 0.5, "r1": 0.0}, rgb)]
    if shape == "torus":
        return [Part("torus", {"centre": o, "axis": "z", "major": 0.4, "minor": 0.15}, rgb)]
    raise ValueError(shape)


def _snowman() -> ToyObject:
    parts = [
        Part("sphere", {"centre": (0.0, 0.0, -0.22), "radius": 0.28}, WHITE),
        Part("sphere", {"centre": (0.0, 0.0, 0.24), "radius": 0.20}, WHITE),
        # Axial coordinate is x (through (0, 0, 0.24)); base radius 0.08 at x = 0.15, apex at x = 0.45.
        Part("cone", {"centre": (0.0, 0.0, 0.24), "axis": "x", "a0": 0.15, "a1": 0.45, "r0": 0.08, "r1": 0.0},
             NOSE_ORANGE, feature=True),
    ]
    return _make("a snowman", "snowman", "white", WHITE, parts)


def _chair() -> ToyObject:
    parts = [
        Part("box", {"lo": (-0.3, -0.3, -0.05), "hi": (0.3, 0.3, 0.05)}, BROWN),  # seat
        Part("box", {"lo": (-0.3, -0.3, 0.05), "hi": (-0.22, 0.3, 0.55)}, BROWN, feature=True),  # back, at -x
    ]
    for sx in (-1.0, 1.0):
        for sy in (-1.0, 1.0):
            cx, cy = 0.25 * sx, 0.25 * sy
            parts.append(Part("box", {"lo": (cx - 0.03, cy - 0.03, -0.5), "hi": (cx + 0.03, cy + 0.03, -0.05)}, BROWN))
    return _make("a chair", "chair", "brown", BROWN, parts)


def _mug() -> ToyObject:
    parts = [
        Part("cylinder", {"centre": (0.0, 0.0, 0.0), "axis": "z", "radius": 0.3, "half_height": 0.35}, WHITE),
        # In the yz-plane means the ring's axis is x.
        Part("torus", {"centre": (0.0, 0.42, 0.0), "axis": "x", "major": 0.14, "minor": 0.04}, WHITE, feature=True),
    ]
    return _make("a mug", "mug", "white", WHITE, parts)


def _build_catalogue() -> dict[str, ToyObject]:
    cat: dict[str, ToyObject] = {}
    for colour, rgb in COLOURS.items():
        for shape in PRIMITIVES:
            name = f"a {colour} {shape}"
            cat[name] = _make(name, shape, colour, rgb, _primitive_parts(shape, rgb))
    for obj in (_snowman(), _chair(), _mug()):
        cat[obj.name] = obj
    return cat


#: prompt -> object, in a fixed order (colour-major primitives, then snowman, chair, mug).
CATALOGUE: dict[str, ToyObject] = _build_catalogue()
#: Largest bound radius over the catalogue (the chair's back corner, ~0.695).
MAX_BOUND_RADIUS: float = max(o.bound_radius for o in CATALOGUE.values())


def list_prompts() -> list[str]:
    """The 33 prompts, in catalogue order (the index used as a prompt id everywhere)."""
    return list(CATALOGUE)


def get_object(prompt: str) -> ToyObject:
    """The catalogue object for an exact prompt (see ``vocab.parse_prompt`` for lenient parsing)."""
    try:
        return CATALOGUE[prompt]
    except KeyError:
        from lift3d.priors.toyworld.vocab import parse_prompt

        return CATALOGUE[parse_prompt(prompt).prompt]


__all__ = [
    "COLOURS",
    "PRIMITIVES",
    "ASYMMETRIC",
    "Part",
    "ToyObject",
    "CATALOGUE",
    "MAX_BOUND_RADIUS",
    "list_prompts",
    "get_object",
]
