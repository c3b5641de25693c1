"""Renderer base class.

A renderer is built with the geometry, material and background it draws and is called with a
camera batch (see ``lift3d.utils.cameras.make_cameras`` for the keys). It returns a dict with at
least ``comp_rgb`` [B,H,W,3], ``opacity`` [B,H,W,1] and ``depth`` [B,H,W,1]; ``comp_normal``
[B,H,W,3] (world-space normals mapped to [0, 1], composited over zero) when the geometry has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lift3d.utils.base import BaseModule


class BaseRenderer(BaseModule):
    category = "renderer"

    @dataclass
    class Config:
        pass

    @classmethod
    def provides_normals(cls, cfg: Any, material_cls: type) -> bool:
        """Whether renders carry ``comp_normal`` with this parsed config and material class; the
        system checks it at start-up against guidances that score normal maps."""
        return False


    def configure(self, geometry: Any = None, material: Any = None, background: Any = None, **kwargs: Any) -> None:
        super().configure(**kwargs)
        # Held without registering as submodules: the system owns them (and their optimizer groups).
        self.__dict__["geometry"] = geometry
        self.__dict__["material"] = material
        self.__dict__["background"] = background

    def set_scene(self, geometry: Any = None, material: Any = None, background: Any = None) -> None:
        """Point the renderer at new parts (after a stage switch swaps one)."""
        for name, obj in (("geometry", geometry), ("material", material), ("background", background)):
            if obj is not None:
                self.__dict__[name] = obj

    def forward(self, rays_o: Tensor, rays_d: Tensor, **batch: Any) -> dict[str, Tensor]:
        raise NotImplementedError
