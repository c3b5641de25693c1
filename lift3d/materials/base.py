"""Material base class: turns geometry features at surface points into colour."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lift3d.utils.base import BaseModule


class BaseMaterial(BaseModule):
    """``forward(features [N,C], **kw) -> rgb [N,3]``.

    Keyword inputs a material may use: ``viewdirs`` [N,3] (from camera to point), ``positions``
    [N,3], ``shading_normal`` [N,3], ``light_positions`` [N,3], ``shading`` (a mode string such as
    ``"diffuse"``, ``"albedo"``, ``"textureless"``). ``requires_normal`` tells renderers to compute
    normals.
    """

    category = "material"
    requires_normal: bool = False

    @dataclass
    class Config:
        pass

    def forward(self, features: Tensor, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def export(self, features: Tensor) -> dict[str, Tensor]:
        """Texture channels for export: at least ``albedo`` [N,3] in [0,1]."""
        return {"albedo": features[..., :3].clamp(0, 1)}
