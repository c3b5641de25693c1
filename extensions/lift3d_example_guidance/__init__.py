"""Example lift3d plugin: a guidance that pulls the rendered object towards a target colour.

It is the worked example of docs/plugins.md. A plugin is any package or module in an
``extensions/`` folder (or a folder named in $LIFT3D_EXTENSIONS, or an installed distribution
with a ``lift3d.plugins`` entry point) that registers classes with ``lift3d.register``.
Select it from YAML with ``system.guidance_type: mean-color-guidance``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lift3d import register
from lift3d.config import Scheduled
from lift3d.guidance.base import BaseGuidance


@register("mean-color-guidance")
class MeanColorGuidance(BaseGuidance):
    """Loss: squared distance between the foreground's mean colour and ``color``.

    Not a diffusion prior: a minimal, honest example of the guidance contract (take renders,
    return ``loss_*`` terms and diagnostics), small enough to read in one sitting.
    """

    @dataclass
    class Config(BaseGuidance.Config):
        color: list[float] = field(default_factory=lambda: [1.0, 0.55, 0.1])
        """Target sRGB colour of the object, each channel in [0, 1]."""
        strength: Scheduled = 1.0
        """Multiplier on the loss; may be a schedule such as [0, 0.0, 1.0, 100] (warm-up)."""

    def configure(self) -> None:
        if len(self.cfg.color) != 3 or not all(0.0 <= c <= 1.0 for c in self.cfg.color):
            raise ValueError(f"mean-color-guidance: color must be three numbers in [0, 1], got {self.cfg.color}")
        # A buffer follows the module across devices; the guidance owns no trainable state.
        self.register_buffer("target", torch.tensor(self.cfg.color, dtype=torch.float32), persistent=False)

    def forward(self, rgb: Tensor, prompt_utils: Any = None, opacity: Tensor | None = None, **batch: Any) -> dict:
        # rgb [B, H, W, 3]; opacity [B, H, W, 1] weights pixels by how much object they show.
        w = torch.ones_like(rgb[..., :1]) if opacity is None else opacity
        mean = (rgb * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1e-6)  # [B, 3]
        loss = ((mean - self.target.to(rgb.dtype)) ** 2).sum(-1).mean()
        return {"loss_color": self.C(self.cfg.strength) * loss, "mean_color_error": loss.detach().sqrt()}
