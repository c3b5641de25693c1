"""A feature field over the scene box: dense multiresolution grids (or a shared encoding) and an MLP.

Geometries whose shape is explicit (DMTet's tetrahedral grid, a fixed mesh) still need features at
surface points for the material; this module gives them one field type, its config fields, the
distillation used at a stage switch (``fit_features``) and a base class that serves
``export_attributes`` from it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lift3d.geometry.base import BaseGeometry
from lift3d.geometry.encodings import get_encoding


class GridFeatureField(nn.Module):
    """Features at points: multiresolution dense 3D grids (trilinear) followed by a small MLP.

    A compact stand-in for a hash grid (InstantNGP) that needs no other module: ``levels`` grids
    with resolutions growing geometrically from ``base_resolution`` to ``max_resolution``, each with
    ``features_per_level`` channels; points outside [-radius, radius]^3 read the border value.
    """

    def __init__(self, n_output_dims: int, radius: float, levels: int = 4, base_resolution: int = 8,
                 max_resolution: int = 64, features_per_level: int = 2, hidden_dims: int = 32,
                 encoding_config: dict | None = None, backend: str = "auto"):
        super().__init__()
        self.radius = float(radius)
        self.n_output_dims = n_output_dims
        self.encoding: nn.Module | None = None
        if encoding_config is not None:
            # A shared encoding (hash grid, frequencies) from lift3d.geometry.encodings instead.
            self.encoding = get_encoding(3, dict(encoding_config), backend)
            n_in = self.encoding.n_output_dims
            self.resolutions: list[int] = []
            self.grids = nn.ParameterList()
        else:
            growth = (max_resolution / base_resolution) ** (1.0 / max(levels - 1, 1))
            self.resolutions = [int(round(base_resolution * growth**i)) for i in range(levels)]
            # Small random init so the MLP sees distinct inputs at distinct places from the start.
            self.grids = nn.ParameterList(
                [nn.Parameter(torch.randn(1, features_per_level, r, r, r) * 0.1) for r in self.resolutions]
            )
            n_in = levels * features_per_level
        self.mlp = nn.Sequential(nn.Linear(n_in, hidden_dims), nn.ReLU(inplace=True), nn.Linear(hidden_dims, n_output_dims))

    def forward(self, points: Tensor) -> Tensor:
        """[..., 3] world points -> [..., n_output_dims] raw features (the material activates them)."""
        shape = points.shape[:-1]
        unit = (points.reshape(-1, 3) / self.radius).clamp(-1, 1)
        if self.encoding is not None:
            enc = self.encoding((unit + 1.0) * 0.5).to(self.mlp[0].weight.dtype)  # encodings take [0, 1]^3
            return self.mlp(enc).reshape(*shape, self.n_output_dims)
        g = unit.view(1, -1, 1, 1, 3).to(self.grids[0].dtype)
        # grid_sample reads (x, y, z) as (W, H, D): a fixed axis permutation, harmless for a learnt field.
        feats = [F.grid_sample(grid, g, mode="bilinear", padding_mode="border", align_corners=True)
                 .view(grid.shape[1], -1).t() for grid in self.grids]
        return self.mlp(torch.cat(feats, -1)).reshape(*shape, self.n_output_dims)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        """Progressive-band encodings unmask levels with the step."""
        if self.encoding is not None and hasattr(self.encoding, "update_step"):
            self.encoding.update_step(epoch, global_step, on_load_weights)


@dataclass
class FeatureFieldConfig:
    """Fields shared by geometries that carry a :class:`GridFeatureField` (DMTet, fixed mesh)."""

    n_feature_dims: int = 3
    """Feature channels exported per surface point (the material's input)."""
    feature_grid_levels: int = 4
    """Number of dense grid levels of the feature field."""
    feature_grid_base_resolution: int = 8
    """Resolution of the coarsest feature grid."""
    feature_grid_max_resolution: int = 64
    """Resolution of the finest feature grid (memory grows with its cube)."""
    feature_grid_features_per_level: int = 2
    """Channels per grid level."""
    feature_mlp_hidden_dims: int = 32
    """Width of the MLP that maps grid features to the exported features."""
    pos_encoding_config: dict | None = None
    """Optional encoding from ``lift3d.geometry.encodings`` (threestudio-style dict, e.g. ``{otype: HashGrid,
    n_levels: 16, ...}``) used instead of the dense grids; null keeps the built-in dense grids."""
    backend: Literal["auto", "torch", "tcnn"] = "auto"
    """Encoding of ``pos_encoding_config``: ``torch``, ``tcnn`` (tiny-cuda-nn, CUDA only) or ``auto`` (tcnn when
    usable). The dense grids and the MLP are always torch."""


def build_feature_field(cfg: Any) -> GridFeatureField:
    return GridFeatureField(
        cfg.n_feature_dims, cfg.radius, cfg.feature_grid_levels, cfg.feature_grid_base_resolution,
        cfg.feature_grid_max_resolution, cfg.feature_grid_features_per_level, cfg.feature_mlp_hidden_dims,
        cfg.pos_encoding_config, cfg.backend,
    )


def fit_features(field: GridFeatureField, source: Any, points: Tensor, steps: int, lr: float = 1e-2,
                 batch: int = 8192) -> float:
    """Distil ``source.export_attributes(points)["features"]`` into ``field``; returns the final MSE.

    Returns NaN (and warns) when the source has no features or a different number of channels.
    """
    try:
        with torch.no_grad():
            target = torch.cat([source.export_attributes(p)["features"] for p in points.split(16384)])
    except NotImplementedError:
        warnings.warn(f"{type(source).__name__} exports no features; the feature field starts untrained")
        return float("nan")
    if target.shape[-1] != field.n_output_dims:
        warnings.warn(f"cannot copy features: source has {target.shape[-1]} channels, this geometry "
                      f"{field.n_output_dims}; the feature field starts untrained")
        return float("nan")
    target = target.to(points.dtype)
    opt = torch.optim.Adam(field.parameters(), lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(0)
    loss = torch.tensor(float("nan"))
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, points.shape[0], (min(batch, points.shape[0]),), generator=gen).to(points.device)
            loss = F.mse_loss(field(points[idx]), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float(torch.cat([(field(p) - t).square().mean(-1) for p, t in
                                zip(points.split(16384), target.split(16384))]).mean())


class FeatureFieldGeometry(BaseGeometry):
    """A geometry whose per-point features come from ``self.feature_field`` (DMTet, fixed meshes)."""

    def export_attributes(self, points: Tensor) -> dict[str, Tensor]:
        return {"features": self.feature_field(points)}

    def forward(self, points: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        return self.export_attributes(points)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        super().update_step(epoch, global_step, on_load_weights)
        self.feature_field.update_step(epoch, global_step, on_load_weights)


__all__ = ["GridFeatureField", "FeatureFieldConfig", "build_feature_field", "fit_features", "FeatureFieldGeometry"]
