"""Unshaded material: the geometry's features are the emitted colour.

This is the radiance of a NeRF (Mildenhall et al., 2020, "NeRF: Representing Scenes as Neural
Radiance Fields for View Synthesis") with the view dependence left out, as text-to-3D recipes
that do not model lighting use it (e.g. the first stage of Magic3D, Lin et al., 2023): colour is
``activation(features[..., :3])``, no normals needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from lift3d.materials.base import BaseMaterial
from lift3d.registry import register


@register("neural-radiance-material")
class NeuralRadianceMaterial(BaseMaterial):
    requires_normal = False

    @dataclass
    class Config(BaseMaterial.Config):
        input_feature_dims: int = 3
        """Feature channels the geometry provides; the first 3 are the colour (pre-activation)."""
        color_activation: Literal["sigmoid", "none"] = "sigmoid"
        """How features become colour: ``sigmoid``, or ``none`` (features already in [0, 1], clamped)."""

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        if self.cfg.input_feature_dims < 3:
            raise ValueError(
                f"neural-radiance-material needs input_feature_dims >= 3 (rgb), got {self.cfg.input_feature_dims}"
            )

    def color(self, features: Float[Tensor, "N C"]) -> Float[Tensor, "N 3"]:
        raw = features[..., :3]
        if self.cfg.color_activation == "sigmoid":
            return torch.sigmoid(raw)
        return raw.clamp(0.0, 1.0)

    def forward(self, features: Float[Tensor, "N C"], **ignored: Any) -> Float[Tensor, "N 3"]:
        return self.color(features)

    def export(self, features: Float[Tensor, "N C"]) -> dict[str, Tensor]:
        return {"albedo": self.color(features)}
