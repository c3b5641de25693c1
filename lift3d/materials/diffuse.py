"""Lambertian material lit by one light plus ambient, with DreamFusion's random shading modes.

DreamFusion (Poole et al., 2022, "DreamFusion: Text-to-3D using 2D Diffusion", sec. 3.1) shades
the NeRF albedo with a point light and, during training, randomly swaps the lit colour for the
plain albedo or for a white ("textureless") surface so the prior must judge the shape by its
shading alone. It starts with albedo only for a while so the geometry first gets a colour.

Colour = albedo * (ambient + diffuse * max(n . l, 0)), clamped to [0, 1]:

* ``light_type: point``: ``l = normalize(light_position - position)`` (random light positions come
  from the camera sampler and reach us as ``light_positions``);
* ``light_type: directional``: ``l = normalize(light_position)``, the light at infinity in that
  direction (this is how the toy-world renderer lights its scenes: ambient 0.35 + diffuse 0.65).

Modes: ``"diffuse"`` (the formula above), ``"albedo"`` (albedo only), ``"textureless"`` (the
formula with a white albedo).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lift3d.config import Scheduled
from lift3d.materials.base import BaseMaterial
from lift3d.registry import register

SHADING_MODES = ("diffuse", "albedo", "textureless")


@register("diffuse-with-point-light-material")
class DiffuseWithPointLightMaterial(BaseMaterial):
    requires_normal = True

    @dataclass
    class Config(BaseMaterial.Config):
        input_feature_dims: int = 3
        """Feature channels the geometry provides; the first 3 are the albedo (pre-activation)."""
        albedo_activation: Literal["sigmoid", "none"] = "sigmoid"
        """How features become albedo: ``sigmoid``, or ``none`` (features already in [0, 1], clamped)."""
        ambient_light_color: tuple[float, float, float] = (0.1, 0.1, 0.1)
        """Ambient light added to every point. DreamFusion-like default 0.1 (with diffuse 0.9); the
        toy world uses 0.35 (with diffuse 0.65)."""
        diffuse_light_color: tuple[float, float, float] = (0.9, 0.9, 0.9)
        """Colour of the light, scaled by max(n . l, 0)."""
        light_type: Literal["point", "directional"] = "point"
        """``point``: light at ``light_positions``; ``directional``: light from direction
        ``normalize(light_positions)``, at infinity."""
        ambient_only_steps: int = 1000
        """Training steps at the start that use the ``albedo`` mode only (no lighting yet)."""
        albedo_prob: Scheduled = 0.25
        """After ``ambient_only_steps``, training probability of the ``albedo`` mode per call."""
        textureless_prob: Scheduled = 0.375
        """After ``ambient_only_steps``, training probability of the ``textureless`` mode per call;
        the rest (default 0.375) is ``diffuse``. Defaults follow DreamFusion: lit with probability
        0.75, half of the lit calls textureless."""
        eval_shading: Literal["diffuse", "albedo", "textureless"] = "diffuse"
        """Mode used outside training when the caller names none."""

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        if self.cfg.input_feature_dims < 3:
            raise ValueError(
                f"diffuse-with-point-light-material needs input_feature_dims >= 3 (albedo), "
                f"got {self.cfg.input_feature_dims}"
            )
        # Buffers so the colours follow .to(device); not persistent because they are config.
        self.register_buffer("ambient_color", torch.tensor(self.cfg.ambient_light_color, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("diffuse_color", torch.tensor(self.cfg.diffuse_light_color, dtype=torch.float32),
                             persistent=False)

    def albedo(self, features: Float[Tensor, "N C"]) -> Float[Tensor, "N 3"]:
        raw = features[..., :3]
        if self.cfg.albedo_activation == "sigmoid":
            return torch.sigmoid(raw)
        return raw.clamp(0.0, 1.0)

    def pick_shading(self) -> str:
        """The mode a training call uses when none is given (DreamFusion's random choice)."""
        if not self.training:
            return self.cfg.eval_shading
        if self.global_step < self.cfg.ambient_only_steps:
            return "albedo"
        p_albedo = float(self.C(self.cfg.albedo_prob))
        p_textureless = float(self.C(self.cfg.textureless_prob))
        # torch's generator, so torch.manual_seed makes the choice reproducible with the rest.
        u = float(torch.rand(()))
        if u < p_albedo:
            return "albedo"
        if u < p_albedo + p_textureless:
            return "textureless"
        return "diffuse"

    def forward(
        self,
        features: Float[Tensor, "N C"],
        viewdirs: Float[Tensor, "N 3"] | None = None,
        positions: Float[Tensor, "N 3"] | None = None,
        shading_normal: Float[Tensor, "N 3"] | None = None,
        light_positions: Float[Tensor, "N 3"] | None = None,
        shading: str | None = None,
        **ignored: Any,
    ) -> Float[Tensor, "N 3"]:
        mode = shading if shading is not None else self.pick_shading()
        if mode not in SHADING_MODES:
            raise ValueError(f"unknown shading mode {mode!r} for diffuse-with-point-light-material; "
                             f"valid: {', '.join(SHADING_MODES)}")
        albedo = self.albedo(features)  # [N, 3]
        if mode == "albedo":
            return albedo
        if shading_normal is None:
            raise ValueError(
                f"diffuse-with-point-light-material: shading mode {mode!r} needs surface normals, but "
                "shading_normal is None; the renderer must compute normals for this material "
                "(requires_normal = True)"
            )
        if light_positions is None:
            raise ValueError(
                f"diffuse-with-point-light-material: shading mode {mode!r} needs light_positions [N, 3] "
                "(the camera batch carries them as 'light_positions')"
            )
        if self.cfg.light_type == "point":
            if positions is None:
                raise ValueError("diffuse-with-point-light-material with light_type 'point' needs positions [N, 3]")
            light_dir = F.normalize(light_positions - positions, dim=-1)  # [N, 3]
        else:
            light_dir = F.normalize(light_positions, dim=-1)  # [N, 3]
        n = F.normalize(shading_normal, dim=-1)
        cos = (n * light_dir).sum(-1, keepdim=True).clamp(min=0.0)  # [N, 1]
        light = self.ambient_color.to(albedo) + self.diffuse_color.to(albedo) * cos  # [N, 3]
        if mode == "textureless":
            return light.clamp(0.0, 1.0)
        return (albedo * light).clamp(0.0, 1.0)

    def export(self, features: Float[Tensor, "N C"]) -> dict[str, Tensor]:
        return {"albedo": self.albedo(features)}
