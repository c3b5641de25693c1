"""A learned environment: a small MLP from view direction to colour.

DreamFusion (Poole et al., 2022, sec. 3.1 and appendix) models the background as an MLP of the
ray direction that the prior may paint freely, so the scene need not explain the backdrop. A
low-frequency encoding keeps it smooth, so it cannot absorb the object itself. In eval mode it
can be replaced by a fixed colour (``eval_color``) for clean renders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lift3d.backgrounds.base import BaseBackground
from lift3d.backgrounds.solid import random_color_aug
from lift3d.registry import register


def frequency_encode(x: Float[Tensor, "... D"], n_frequencies: int) -> Float[Tensor, "... E"]:
    """``[x, sin(2^k pi x), cos(2^k pi x)]`` for k < n_frequencies; E = D * (1 + 2 n_frequencies)."""
    if n_frequencies == 0:
        return x
    freqs = (2.0 ** torch.arange(n_frequencies, device=x.device, dtype=x.dtype)) * math.pi  # [F]
    xf = x[..., None, :] * freqs[:, None]  # [..., F, D]
    enc = torch.cat([torch.sin(xf), torch.cos(xf)], dim=-1).flatten(-2)  # [..., 2 F D]
    return torch.cat([x, enc], dim=-1)


@register("neural-environment-map-background")
class NeuralEnvironmentMapBackground(BaseBackground):
    @dataclass
    class Config(BaseBackground.Config):
        n_output_dims: int = 3
        """Output channels (3 for rgb)."""
        n_frequencies: int = 4
        """Frequency bands of the direction encoding; few, so the background stays smooth."""
        n_neurons: int = 32
        """Width of the hidden layers."""
        n_hidden_layers: int = 2
        """Number of hidden layers."""
        color_activation: Literal["sigmoid", "none"] = "sigmoid"
        """Output activation: ``sigmoid`` into [0, 1], or ``none`` (raw outputs)."""
        random_aug: bool = False
        """In training, replace the output by a random colour (per image) with ``random_aug_prob``."""
        random_aug_prob: float = 0.5
        """Probability of the random colour per image."""
        random_aug_shared: bool = False
        """One random draw for the whole batch (all images get the same random colour)."""
        eval_color: tuple[float, ...] | None = None
        """If set, eval mode returns this fixed colour instead of the MLP (e.g. [1, 1, 1])."""

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        cfg = self.cfg
        if cfg.eval_color is not None and len(cfg.eval_color) != cfg.n_output_dims:
            raise ValueError(
                f"neural-environment-map-background: eval_color has {len(cfg.eval_color)} values, "
                f"n_output_dims is {cfg.n_output_dims}"
            )
        dims = [3 * (1 + 2 * cfg.n_frequencies)] + [cfg.n_neurons] * cfg.n_hidden_layers + [cfg.n_output_dims]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.network = nn.Sequential(*layers)

    def forward(self, dirs: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B H W C"]:
        if not self.training and self.cfg.eval_color is not None:
            color = torch.tensor(self.cfg.eval_color, dtype=dirs.dtype, device=dirs.device)
            return color.expand(*dirs.shape[:-1], self.cfg.n_output_dims)
        d = F.normalize(dirs, dim=-1)
        out = self.network(frequency_encode(d, self.cfg.n_frequencies).to(self.network[0].weight.dtype))
        if self.cfg.color_activation == "sigmoid":
            out = torch.sigmoid(out)
        out = out.to(dirs.dtype)  # [B, H, W, C]
        if self.training and self.cfg.random_aug:
            out = random_color_aug(out, self.cfg.random_aug_prob, self.cfg.random_aug_shared)
        return out
