"""A background of one colour, fixed or learned, with random-colour augmentation.

Random background colours during training (as threestudio does for its backgrounds, and
Magic3D / ProlificDreamer recipes rely on) keep the geometry from explaining the background
with semi-transparent floaters of the background colour: a colour that changes every step
cannot be baked into the object. ``random_aug_prob: 1.0`` gives a random colour every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from lift3d.backgrounds.base import BaseBackground
from lift3d.registry import register


def random_color_aug(rgb: Float[Tensor, "B H W C"], prob: float, shared: bool) -> Float[Tensor, "B H W C"]:
    """Replace whole images of ``rgb`` by uniform random colours, each with probability ``prob``.

    ``shared``: one draw (and one colour) for the whole batch instead of one per image.
    """
    B, C = rgb.shape[0], rgb.shape[-1]
    n = 1 if shared else B
    replace = (torch.rand(n, device=rgb.device) < prob).expand(B)  # [B]
    color = torch.rand(n, C, device=rgb.device, dtype=rgb.dtype).expand(B, C)  # [B, C]
    return torch.where(replace[:, None, None, None], color[:, None, None, :].expand_as(rgb), rgb)


@register("solid-color-background")
class SolidColorBackground(BaseBackground):
    @dataclass
    class Config(BaseBackground.Config):
        color: tuple[float, float, float] = (1.0, 1.0, 1.0)
        """The colour in [0, 1] (its initial value when ``learned``)."""
        learned: bool = False
        """Make the colour a trainable parameter."""
        random_aug: bool = False
        """In training, replace the colour by a random one (per image) with ``random_aug_prob``."""
        random_aug_prob: float = 0.5
        """Probability of the random colour per image (1.0: a new random colour every step)."""
        random_aug_shared: bool = False
        """One random draw for the whole batch (all images get the same random colour)."""

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        color = torch.tensor(self.cfg.color, dtype=torch.float32)
        if self.cfg.learned:
            self.color = nn.Parameter(color)
        else:
            self.register_buffer("color", color, persistent=False)

    def forward(self, dirs: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B H W 3"]:
        rgb = self.color.to(dirs)[None, None, None, :].expand(*dirs.shape[:-1], 3)  # [B, H, W, 3]
        if self.training and self.cfg.random_aug:
            rgb = random_color_aug(rgb, self.cfg.random_aug_prob, self.cfg.random_aug_shared)
        return rgb
