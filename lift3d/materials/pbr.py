"""Physically based material (albedo, roughness, metallic, normal perturbation) under an environment.

Fantasia3D (Chen et al., 2023, "Fantasia3D: Disentangling Geometry and Appearance for
High-quality Text-to-3D Content Creation", sec. 3.2) learns a spatially varying BRDF: diffuse
albedo k_d, roughness and metallic k_rm, and a normal perturbation k_n, rendered under a fixed
HDR environment with the split-sum approximation (Karis, 2013):

    colour = albedo (1 - metallic) E(n) / pi + prefiltered(reflect(-v, n), roughness) (F0 A + B)
    F0 = mix(0.04, albedo, metallic)

where (A, B) is the split-sum BRDF table. See ``envlight.py`` for the lighting precomputation.

Features: [albedo 3, roughness 1, metallic 1] (+ [normal perturbation 3] with ``use_bump``),
all pre-activation; each goes through a sigmoid into its configured range.
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
from lift3d.materials.envlight import EnvLight, env_brdf, linear_to_srgb, srgb_to_linear
from lift3d.registry import register

PBR_MODES = ("pbr", "diffuse", "albedo", "textureless", "roughness", "metallic")


@register("pbr-material")
class PBRMaterial(BaseMaterial):
    requires_normal = True

    @dataclass
    class Config(BaseMaterial.Config):
        input_feature_dims: int = 5
        """Feature channels: albedo 3, roughness 1, metallic 1, and 3 more with ``use_bump``."""
        use_bump: bool = False
        """Read features 5:8 as a world-space perturbation of the shading normal."""
        bump_scale: float = 0.5
        """Largest length of the normal perturbation: n' = normalize(n + bump_scale * tanh(f[5:8]))."""
        min_albedo: float = 0.0
        """Albedo range: min + (max - min) * sigmoid(f[0:3])."""
        max_albedo: float = 1.0
        """Upper end of the albedo range."""
        min_roughness: float = 0.08
        """Roughness range (perceptual roughness, GGX alpha = roughness^2); a floor avoids
        mirror-like aliasing of the prefiltered lighting."""
        max_roughness: float = 1.0
        """Upper end of the roughness range."""
        min_metallic: float = 0.0
        """Metallic range: min + (max - min) * sigmoid(f[4])."""
        max_metallic: float = 1.0
        """Upper end of the metallic range."""
        environment_texture: str | None = None
        """Equirect environment (+z up): .hdr, .npy, .png/.jpg (sRGB), .exr if imageio reads it.
        None: a procedural sky with a sun."""
        environment_scale: Scheduled = 1.0
        """Multiplier on the environment's radiance."""
        environment_resolution: int = 64
        """Height of the working environment map (width is twice it); prefiltering cost grows as its 4th power."""
        environment_levels: int = 6
        """Prefiltered roughness levels (0, 1/(n-1), ..., 1), linearly interpolated."""
        sun_elevation_deg: float = 45.0
        """Procedural sky only: elevation of the sun."""
        sun_azimuth_deg: float = 30.0
        """Procedural sky only: azimuth of the sun (0 = +x, the front)."""
        sun_strength: float = 0.5
        """Procedural sky only: brightness the sun adds to a white diffuse surface facing it."""
        color_space: Literal["linear", "srgb"] = "linear"
        """``linear``: shade the albedo as it is and clamp; ``srgb``: treat the albedo as sRGB,
        shade in linear space, encode the result back to sRGB (what Fantasia3D does)."""
        default_shading: Literal["pbr", "diffuse", "albedo", "textureless", "roughness", "metallic"] = "pbr"
        """Mode when the caller names none. ``diffuse`` is an alias of ``pbr`` (full shading), so
        renderers passing the diffuse material's modes work; ``textureless``: white albedo, no
        metal; ``roughness`` / ``metallic``: the channel as gray, for inspection."""

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        cfg = self.cfg
        need = 8 if cfg.use_bump else 5
        if cfg.input_feature_dims < need:
            raise ValueError(
                f"pbr-material needs input_feature_dims >= {need} (albedo 3, roughness 1, metallic 1"
                f"{', bump 3' if cfg.use_bump else ''}), got {cfg.input_feature_dims}"
            )
        for name in ("albedo", "roughness", "metallic"):
            lo, hi = getattr(cfg, f"min_{name}"), getattr(cfg, f"max_{name}")
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"pbr-material: need 0 <= min_{name} <= max_{name} <= 1, got {lo}, {hi}")
        if cfg.environment_texture:
            self.envlight = EnvLight.from_file(cfg.environment_texture, cfg.environment_resolution,
                                               cfg.environment_levels)
        else:
            self.envlight = EnvLight.procedural(
                cfg.environment_resolution, cfg.environment_levels, sun_elevation_deg=cfg.sun_elevation_deg,
                sun_azimuth_deg=cfg.sun_azimuth_deg, sun_strength=cfg.sun_strength,
            )

    def channels(self, features: Float[Tensor, "N C"]) -> dict[str, Tensor]:
        """Activated channels: albedo [N,3], roughness [N,1], metallic [N,1] (+ bump [N,3] in [-1, 1])."""
        cfg = self.cfg
        s = torch.sigmoid(features[..., :5])
        out = {
            "albedo": cfg.min_albedo + (cfg.max_albedo - cfg.min_albedo) * s[..., :3],
            "roughness": cfg.min_roughness + (cfg.max_roughness - cfg.min_roughness) * s[..., 3:4],
            "metallic": cfg.min_metallic + (cfg.max_metallic - cfg.min_metallic) * s[..., 4:5],
        }
        if cfg.use_bump:
            out["bump"] = torch.tanh(features[..., 5:8])
        return out

    def shade_components(
        self,
        albedo: Float[Tensor, "N 3"],
        roughness: Float[Tensor, "N 1"],
        metallic: Float[Tensor, "N 1"],
        normal: Float[Tensor, "N 3"],
        viewdirs: Float[Tensor, "N 3"],
    ) -> dict[str, Tensor]:
        """Split-sum shading in linear space: ``diffuse`` and ``specular`` [N, 3], before clamping."""
        n = F.normalize(normal, dim=-1)
        v = -F.normalize(viewdirs, dim=-1)  # towards the camera
        n_dot_v = (n * v).sum(-1, keepdim=True)  # [N, 1]
        refl = 2.0 * n_dot_v * n - v  # [N, 3], mirror direction of the view ray
        scale = float(self.C(self.cfg.environment_scale))
        diffuse = albedo * (1.0 - metallic) * self.envlight.diffuse(n) * scale
        f0 = 0.04 + (albedo - 0.04) * metallic  # [N, 3]
        a, b = env_brdf(n_dot_v.clamp(1e-4, 1.0), roughness)  # [N, 1] each
        specular = self.envlight.specular(refl, roughness) * scale * (f0 * a + b)
        return {"diffuse": diffuse, "specular": specular}

    def forward(
        self,
        features: Float[Tensor, "N C"],
        viewdirs: Float[Tensor, "N 3"] | None = None,
        shading_normal: Float[Tensor, "N 3"] | None = None,
        shading: str | None = None,
        **ignored: Any,
    ) -> Float[Tensor, "N 3"]:
        mode = shading if shading is not None else self.cfg.default_shading
        if mode not in PBR_MODES:
            raise ValueError(f"unknown shading mode {mode!r} for pbr-material; valid: {', '.join(PBR_MODES)}")
        ch = self.channels(features)
        if mode == "albedo":
            return ch["albedo"]
        if mode in ("roughness", "metallic"):
            return ch[mode].expand(*ch[mode].shape[:-1], 3)
        if shading_normal is None:
            raise ValueError(
                "pbr-material needs surface normals, but shading_normal is None; the renderer must compute "
                "normals for this material (requires_normal = True)"
            )
        if viewdirs is None:
            raise ValueError("pbr-material needs viewdirs [N, 3] (unit, from the camera to the point)")
        albedo, metallic = ch["albedo"], ch["metallic"]
        normal = shading_normal
        if self.cfg.use_bump:
            normal = F.normalize(shading_normal, dim=-1) + self.cfg.bump_scale * ch["bump"]
        if mode == "textureless":
            albedo, metallic = torch.ones_like(albedo), torch.zeros_like(metallic)
        srgb = self.cfg.color_space == "srgb"
        if srgb:
            albedo = srgb_to_linear(albedo)
        comp = self.shade_components(albedo, ch["roughness"], metallic, normal, viewdirs)
        rgb = comp["diffuse"] + comp["specular"]
        if srgb:
            rgb = linear_to_srgb(rgb)
        return rgb.clamp(0.0, 1.0)

    def export(self, features: Float[Tensor, "N C"]) -> dict[str, Tensor]:
        """``albedo`` [N,3], ``roughness`` [N,1], ``metallic`` [N,1] in [0, 1]; with ``use_bump`` also
        ``bump`` [N,3]: the world-space normal perturbation in [-1, 1] (times ``bump_scale``)."""
        ch = self.channels(features)
        if "bump" in ch:
            ch["bump"] = ch["bump"] * self.cfg.bump_scale
        return ch
