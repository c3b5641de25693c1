"""A learnable equirectangular texture as the background, looked up by ray direction.

An explicit alternative to the MLP environment of DreamFusion (Poole et al., 2022): the texture
is ``height x width x channels`` logits on an equirect grid with +z up (row 0 is the zenith, +x
the centre column, +y a quarter from the left; the same mapping as the PBR environment maps in
``lift3d.materials.envlight``), sampled bilinearly and wrapped around in azimuth. A coarse grid
keeps it smooth. ``channels`` may differ from 3 for latent-space rendering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from lift3d.backgrounds.base import BaseBackground
from lift3d.materials.envlight import sample_equirect
from lift3d.registry import register


@register("textured-background")
class TexturedBackground(BaseBackground):
    @dataclass
    class Config(BaseBackground.Config):
        height: int = 32
        """Rows of the texture (polar angle from +z down to -z)."""
        width: int = 64
        """Columns of the texture (azimuth); usually twice the height."""
        channels: int = 3
        """Output channels (3 for rgb)."""
        color_activation: Literal["sigmoid", "none"] = "sigmoid"
        """``sigmoid``: the texture holds logits and the output is in [0, 1]; ``none``: raw values."""
        init_color: tuple[float, ...] | None = None
        """Initial colour of every texel (after the activation), e.g. [0.5, 0.5, 0.5]; None: small
        random values around 0.5."""

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        cfg = self.cfg
        if cfg.height < 1 or cfg.width < 1 or cfg.channels < 1:
            raise ValueError(f"textured-background: height, width and channels must be >= 1, got "
                             f"{cfg.height}, {cfg.width}, {cfg.channels}")
        if cfg.init_color is not None:
            if len(cfg.init_color) != cfg.channels:
                raise ValueError(f"textured-background: init_color has {len(cfg.init_color)} values, "
                                 f"channels is {cfg.channels}")
            c = torch.tensor(cfg.init_color, dtype=torch.float32)
            if cfg.color_activation == "sigmoid":
                c = torch.logit(c.clamp(1e-4, 1 - 1e-4))
            init = c[:, None, None].expand(cfg.channels, cfg.height, cfg.width).clone()
        else:
            init = 0.1 * torch.randn(cfg.channels, cfg.height, cfg.width)
            if cfg.color_activation == "none":
                init = init + 0.5
        self.texture = nn.Parameter(init)  # [C, H, W]

    def forward(self, dirs: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B H W C"]:
        out = sample_equirect(self.texture, dirs.to(self.texture.dtype))  # [B, H, W, C]
        if self.cfg.color_activation == "sigmoid":
            out = torch.sigmoid(out)
        return out.to(dirs.dtype)

    def export_texture(self) -> Float[Tensor, "H W C"]:
        """The texture after its activation, as an equirect image (row 0 = +z)."""
        tex = self.texture.detach()
        if self.cfg.color_activation == "sigmoid":
            tex = torch.sigmoid(tex)
        return tex.permute(1, 2, 0)

