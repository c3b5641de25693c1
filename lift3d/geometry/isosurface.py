"""Isosurface extraction from a sampled scalar field (marching cubes via PyMCubes)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lift3d.geometry.base import IsosurfaceError
from lift3d.utils.mesh import Mesh


def grid_points(resolution: int, radius: float, device: torch.device | str = "cpu") -> Tensor:
    """[R, R, R, 3] sample positions covering [-radius, radius]^3, ends included, indexed [x, y, z]."""
    t = torch.linspace(-radius, radius, resolution, device=device)
    return torch.stack(torch.meshgrid(t, t, t, indexing="ij"), dim=-1)


def fill_cavities(level: Tensor) -> Tensor:
    """Make enclosed outside pockets of a level grid [R, R, R] inside (negative).

    A radiance field only needs density on its visible shell: the interior may stay empty, and
    marching cubes would then add inner surfaces facing the wrong way. Outside is what connects
    to the grid's border; any positive region it cannot reach becomes inside (just below zero,
    so the outer surface does not move).
    """
    from scipy.ndimage import binary_fill_holes

    inside = (level < 0).cpu().numpy()
    filled = torch.from_numpy(binary_fill_holes(inside)).to(level.device)
    cavity = filled & (level >= 0)
    return torch.where(cavity, -level.abs() - 1e-6, level)


def marching_cubes_grid(level: Tensor, radius: float, what: str = "field") -> Mesh:
    """Surface where ``level`` [R, R, R] (sampled on :func:`grid_points`) crosses zero.

    ``level`` is negative inside. Faces come out counter-clockwise seen from outside. An empty
    result raises :class:`IsosurfaceError` with what the field's range was, so the caller can
    suggest a threshold.
    """
    import mcubes

    if level.ndim != 3 or len(set(level.shape)) != 1:
        raise ValueError(f"level must be a cubic [R, R, R] grid, got {tuple(level.shape)}")
    lv = level.detach().float().cpu().numpy()
    if not np.isfinite(lv).all():
        raise IsosurfaceError(f"the {what} has NaN or Inf values; the model has diverged (check the losses)")
    lo, hi = float(lv.min()), float(lv.max())
    if not (lo < 0.0 < hi):
        inside = "everywhere inside" if hi <= 0 else "everywhere outside"
        raise IsosurfaceError(
            f"empty isosurface: the {what} is {inside} the surface level over the whole grid "
            f"(level range [{lo:.4g}, {hi:.4g}]); set the isosurface threshold inside the field's range "
            "(or 'auto'), or train more steps"
        )
    # mcubes treats values > isovalue as inside; we pass -level so inside is positive.
    verts, faces = mcubes.marching_cubes(-lv, 0.0)
    if len(faces) == 0:
        raise IsosurfaceError(f"empty isosurface: marching cubes found no triangles in the {what}")
    R = level.shape[0]
    verts = verts / (R - 1) * 2.0 * radius - radius
    v = torch.from_numpy(verts.astype(np.float32)).to(level.device)
    f = torch.from_numpy(faces.astype(np.int64)).to(level.device)
    mesh = Mesh(v, f)
    # Orient outward: the signed volume of a closed outward-facing surface is positive.
    tri = v[f]
    signed_volume = (tri[:, 0] * torch.cross(tri[:, 1], tri[:, 2], dim=-1)).sum() / 6.0
    if signed_volume < 0:
        mesh = Mesh(v, f[:, [0, 2, 1]])
    return mesh
