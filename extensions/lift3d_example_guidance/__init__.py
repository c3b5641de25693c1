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
from lift3d.guidance.base import BaseGuidance, GuidanceInput, GuidanceOutput


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

    @classmethod
    def requires(cls, cfg: Any) -> frozenset[str]:
        return frozenset({"opacity"})  # the system checks at start-up that the renderer gives it

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        # inp.rgb [B, H, W, 3]; inp.opacity [B, H, W, 1] weights pixels by how much object they show.
        w = inp.opacity
        mean = (inp.rgb * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1e-6)  # [B, 3]
        loss = ((mean - self.target.to(inp.rgb.dtype)) ** 2).sum(-1).mean()
        return GuidanceOutput(losses={"loss_color": self.C(self.cfg.strength) * loss},
                              diagnostics={"mean_color_error": loss.detach().sqrt()})
