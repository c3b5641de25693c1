"""Occupancy grid for skipping empty space in volume rendering (torch reference).

The scheme is the one of InstantNGP (Mueller et al., SIGGRAPH 2022) and nerfacc's
``OccGridEstimator`` (Li et al., "NerfAcc: Efficient Sampling Accelerates NeRFs", ICCV 2023):
a cubic grid over the scene box keeps, per cell, an exponential moving maximum of the field's
opacity ``density * step_size`` at random points of the cell; cells above
``min(mean, threshold)`` are occupied. During warm-up every cell is refreshed; afterwards a random
quarter of all cells plus as many currently occupied ones. The occupied set is then grown by
``dilation`` cells (one random point per cell can miss matter in a boundary cell). Samples in
unoccupied cells are dropped before the field is evaluated, which is where the speed comes from.

Before its first update the grid reports everything occupied, so rendering never goes blank, and
its first update refreshes every cell whatever the step (a grid restored from a checkpoint without
grid state must not be rebuilt from a quarter of its cells).

State: the persistent buffers ``occs`` (per-cell running maximum), ``binary`` (the occupied mask
after dilation) and ``n_updates`` are part of the owner's state dict, so a resumed run prunes
exactly as the uninterrupted one. Radius, resolution and dilation come from the config. Loading a
state dict without these keys (checkpoints written before the grid was saved) or with another
resolution keeps a fresh grid and warns; the next update rebuilds it from the field.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor


class OccupancyGrid(nn.Module):
    """``resolution``^3 cells over [-radius, radius]^3; ``occupied(points)`` is the pruning test."""

    STATE = ("occs", "binary", "n_updates")

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

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the state before any update: no evidence, every cell occupied."""
        self.occs.zero_()
        self.binary.fill_(True)
        self.n_updates.zero_()

    @torch.no_grad()
    def adopt(self, occs: Tensor, binary: Tensor) -> None:
        """Take the state of another grid over the same cells (nerfacc's estimator) and count an update.

        occs [R^3] and binary [R^3] or [R, R, R], cells in this grid's order (x-major).
        """
        self.occs.copy_(occs.reshape(-1).to(self.occs))
        self.binary.copy_(binary.reshape(self.binary.shape).to(self.binary))
        self.n_updates += 1

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        keys = {name: prefix + name for name in self.STATE}
        absent = [k for k in keys.values() if k not in state_dict]
        problem = None
        if absent:
            problem = f"has no occupancy grid state (missing {', '.join(absent)})"
        elif state_dict[keys["occs"]].numel() != self.occs.numel():
            n = round(state_dict[keys["occs"]].numel() ** (1.0 / 3.0))
            problem = f"holds a {n}^3 occupancy grid, this renderer's grid_resolution is {self.resolution}"
        if problem is None:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            return
        # The grid is a cache of the field: start afresh rather than fail the whole load.
        warnings.warn(f"checkpoint {problem}: the grid starts with every cell occupied and is rebuilt from the "
                      "field at its next update (renders until then are unpruned, so a resumed run may differ)",
                      stacklevel=2)
        self.reset()

    def _cell_points(self, idx: Tensor) -> Tensor:
        """Random world points inside cells ``idx`` [K] -> [K, 3]."""
        u = torch.rand(idx.shape[0], 3, device=self.occs.device)
        return (self.cell_coords[idx].float() + u) / self.resolution * (2.0 * self.radius) - self.radius

    @torch.no_grad()
    def update(self, occ_eval_fn: Callable[[Tensor], Tensor], occ_thre: float = 0.01, ema_decay: float = 0.95,
               warmup: bool = True, chunk: int = 65536) -> None:
        """Refresh cells with ``occ_eval_fn(points [K, 3]) -> opacity [K, 1] or [K]``.

        ``warmup``: refresh every cell (the first updates); otherwise a random quarter of all
        cells and as many occupied ones. The first update of a grid is always a full refresh.
        """
        n = self.occs.numel()
        dev = self.occs.device
        if warmup or int(self.n_updates) == 0:
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
