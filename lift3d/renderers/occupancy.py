"""Occupancy grid for skipping empty space in volume rendering (torch reference).

The scheme is the one of InstantNGP (Mueller et al., SIGGRAPH 2022) and nerfacc's
``OccGridEstimator`` (Li et al., "NerfAcc: Efficient Sampling Accelerates NeRFs", ICCV 2023):
a cubic grid over the scene box keeps, per cell, an exponential moving maximum of the field's
opacity ``density * step_size`` at random points of the cell; cells above
``min(mean, threshold)`` are occupied. During warm-up every cell is refreshed; afterwards a random
quarter of all cells plus as many currently occupied ones. The occupied set is then grown by
``dilation`` cells (one random point per cell can miss matter in a boundary cell). Samples in
unoccupied cells are dropped before the field is evaluated, which is where the speed comes from.

Before its first update the grid reports everything occupied, so rendering never goes blank.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor


class OccupancyGrid(nn.Module):
    """``resolution``^3 cells over [-radius, radius]^3; ``occupied(points)`` is the pruning test."""

    def __init__(self, radius: float, resolution: int = 32, dilation: int = 1) -> None:
        super().__init__()
        self.radius = float(radius)
        self.dilation = int(dilation)
        self.resolution = int(resolution)
        n = self.resolution**3
        self.register_buffer("occs", torch.zeros(n))  # [R^3] EMA of per-cell opacity
        self.register_buffer("binary", torch.ones(self.resolution, self.resolution, self.resolution, dtype=torch.bool))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))
        r = torch.arange(self.resolution)
        cells = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).view(-1, 3)
        self.register_buffer("cell_coords", cells, persistent=False)  # [R^3, 3] integer (x, y, z)

    @property
    def occupied_fraction(self) -> float:
        return float(self.binary.float().mean())

    def _cell_points(self, idx: Tensor) -> Tensor:
        """Random world points inside cells ``idx`` [K] -> [K, 3]."""
        u = torch.rand(idx.shape[0], 3, device=self.occs.device)
        return (self.cell_coords[idx].float() + u) / self.resolution * (2.0 * self.radius) - self.radius

    @torch.no_grad()
    def update(self, occ_eval_fn: Callable[[Tensor], Tensor], occ_thre: float = 0.01, ema_decay: float = 0.95,
               warmup: bool = True, chunk: int = 65536) -> None:
        """Refresh cells with ``occ_eval_fn(points [K, 3]) -> opacity [K, 1] or [K]``.

        ``warmup``: refresh every cell (the first updates); otherwise a random quarter of all
        cells and as many occupied ones.
        """
        n = self.occs.numel()
        dev = self.occs.device
        if warmup:
            idx = torch.arange(n, device=dev)
        else:
            k = n // 4
            rand_idx = torch.randint(0, n, (k,), device=dev)
            occ_idx = torch.nonzero(self.binary.view(-1)).view(-1)
            if occ_idx.numel() > k:
                occ_idx = occ_idx[torch.randint(0, occ_idx.numel(), (k,), device=dev)]
            idx = torch.cat([rand_idx, occ_idx])
        pts = self._cell_points(idx)
        occ = torch.cat([occ_eval_fn(p).reshape(-1) for p in pts.split(chunk)]).to(self.occs.dtype)
        # Duplicated indices: keep the largest fresh value per cell.
        fresh = torch.zeros_like(self.occs).scatter_reduce_(0, idx, occ, reduce="amax", include_self=False)
        touched = torch.zeros(n, dtype=torch.bool, device=dev)
        touched[idx] = True
        self.occs.copy_(torch.where(touched, torch.maximum(self.occs * ema_decay, fresh), self.occs))
        thre = min(float(self.occs.mean()), occ_thre)
        binary = (self.occs > thre).view(1, 1, *self.binary.shape).float()
        if self.dilation > 0:
            # One random point per cell can miss the part of a boundary cell that holds matter;
            # growing the occupied set by a cell keeps those samples (at a small cost in pruning).
            k = 2 * self.dilation + 1
            binary = torch.nn.functional.max_pool3d(binary, k, stride=1, padding=self.dilation)
        self.binary.copy_(binary.view_as(self.binary) > 0.5)
        self.n_updates += 1

    def occupied(self, points: Tensor) -> Tensor:
        """points [..., 3] -> bool [...]: inside the box and in an occupied cell."""
        u = (points + self.radius) / (2.0 * self.radius)  # [..., 3] in [0, 1] inside the box
        inside = ((u >= 0.0) & (u <= 1.0)).all(-1)
        ijk = (u * self.resolution).long().clamp(0, self.resolution - 1)
        R = self.resolution
        flat = (ijk[..., 0] * R + ijk[..., 1]) * R + ijk[..., 2]
        return inside & self.binary.view(-1)[flat]


__all__ = ["OccupancyGrid"]
