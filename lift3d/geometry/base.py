"""Geometry base classes: what renderers, systems and exporters may call on any geometry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lift3d.utils.base import BaseModule
from lift3d.utils.mesh import Mesh


class IsosurfaceError(RuntimeError):
    """Extraction found no surface; the message suggests the threshold or more training."""


class BaseGeometry(BaseModule):
    category = "geometry"

    @dataclass
    class Config:
        radius: float = 1.0
        """Half-size of the bounding box [-radius, radius]^3 the geometry lives in."""


    def isosurface(self) -> Mesh:
        """The surface as a triangle mesh (for export and stage switches)."""
        raise NotImplementedError(f"{type(self).__name__} cannot extract a surface")

    def export_attributes(self, points: Tensor) -> dict[str, Tensor]:
        """Per-point features at surface points, for texture baking: at least ``features`` [N, C]."""
        raise NotImplementedError(f"{type(self).__name__} has no features to export")

    @classmethod
    def create_from(cls, other: "BaseGeometry", cfg: Any = None, **kwargs: Any) -> "BaseGeometry":
        """Build this geometry from another one (a stage switch, e.g. NeRF -> DMTet).

        The default handles only the same type: a fresh instance with ``other``'s weights.
        """
        if type(other) is cls:
            new = cls(cfg, **kwargs)
            new.load_state_dict(other.state_dict(), strict=False)
            return new
        raise NotImplementedError(
            f"cannot convert geometry {getattr(type(other), 'registry_name', type(other).__name__)!r} into "
            f"{getattr(cls, 'registry_name', cls.__name__)!r}: {cls.__name__}.create_from does not support it"
        )


class BaseImplicitGeometry(BaseGeometry):
    """A field queried at points: density (NeRF) or signed distance (NeuS), plus features.

    ``forward(points [..., 3], output_normal=False)`` returns ``features`` [..., C] and either
    ``density`` [..., 1] (volume, raw pre-activation allowed only if documented) or ``sdf`` [..., 1],
    and ``normal`` [..., 3] (unit, outward) when asked.
    """

    def forward_field(self, points: Tensor) -> Tensor:
        """The scalar field [..., 1] the surface is a level set of (density or sdf)."""
        raise NotImplementedError

    def forward_level(self, field: Tensor) -> Tensor:
        """Signed level [..., 1]: negative inside, zero on the surface (uses the configured threshold)."""
        raise NotImplementedError
