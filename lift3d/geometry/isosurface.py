"""Isosurface extraction from a sampled scalar field (marching cubes via PyMCubes).

Also what density fields need before marching cubes: filling hollow interiors
(:func:`fill_cavities`, :func:`fill_hidden`) and choosing the density level whose surface is the
one the field renders (:func:`opacity_matched_level`, the ``auto`` threshold of NeRFs and
Gaussians).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
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


def fill_hidden(level: Tensor, extinction: Tensor, spacing: float) -> Tensor:
    """Make outside points of a level grid [R, R, R] inside when they are hidden behind its inside.

    A point is hidden when, along each of the six axis directions, the ray from the grid's border
    has gone through an optical depth of at least ln 2 (the rendered opacity is already 50%)
    before reaching it, and along at least one of them it has also gone through the inside
    (``level < 0``). ``extinction`` [R, R, R] is the density the field renders with (per world
    unit), ``spacing`` the distance between grid samples. Unlike :func:`fill_cavities` this is
    not undone by a pinhole: a hollow NeRF whose shell leaks at the chosen level (a thin spot, a
    part no camera saw) is still filled, except along the straight lines through the leak. Nothing
    is filled where the level set is empty, so a threshold above the field still fails loudly.
    """
    ext = extinction.to(torch.float64).clamp(min=0.0)
    inside = (level < 0).to(torch.int32)
    opaque_all = torch.ones_like(level, dtype=torch.bool)
    crossed_any = torch.zeros_like(level, dtype=torch.bool)
    ln2 = math.log(2.0)
    for axis in range(3):
        for flip in (False, True):
            e = ext.flip(axis) if flip else ext
            n = e.shape[axis]
            seg = 0.5 * (e.narrow(axis, 1, n - 1) + e.narrow(axis, 0, n - 1)) * spacing  # trapezoids
            depth = torch.cat([torch.zeros_like(e.narrow(axis, 0, 1)), torch.cumsum(seg, axis)], axis)
            opaque = depth >= ln2
            crossed = torch.cumsum(inside.flip(axis) if flip else inside, axis) > 0
            opaque_all &= opaque.flip(axis) if flip else opaque
            crossed_any |= crossed.flip(axis) if flip else crossed
    return torch.where(opaque_all & crossed_any & (level >= 0), -level.abs() - 1e-6, level)


# ---------------------------------------------------------------------------------------------
# The "auto" level of density fields: the level set that best matches the rendered surface.

AUTO_VIEWS = 20
"""Directions (Fibonacci sphere) the rendered surface is compared from."""
AUTO_RAYS = 64
"""Orthographic rays per side of each view."""
AUTO_LEVELS = 96
"""Candidate levels, log-spaced between max * 1e-6 and the maximum of the field."""


def sphere_directions(n: int) -> Tensor:
    """[n, 3] nearly uniform unit vectors (Fibonacci sphere), float64."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = math.pi * (1.0 + math.sqrt(5.0)) * i
    rho = torch.sqrt(1.0 - z * z)
    return torch.stack([rho * torch.cos(phi), rho * torch.sin(phi), z], dim=-1)


def sample_orthographic(grids: list[Tensor], radius: float, direction: Tensor,
                        n_rays: int) -> tuple[list[Tensor], float]:
    """Trilinear samples of grids [R, R, R] (on :func:`grid_points`) along orthographic rays.

    ``n_rays``^2 parallel rays along ``direction`` [3] cover the bounding sphere of the box and
    march through it with about the grid's spacing. Returns one [n_rays^2, S] tensor per grid (rays
    run from the viewer into the scene; zero outside the box) and the step between samples.
    """
    R = grids[0].shape[0]
    half = radius * math.sqrt(3.0)
    S = int(math.ceil(2.0 * half / (2.0 * radius / (R - 1)))) + 1
    step = 2.0 * half / (S - 1)
    dev = grids[0].device
    d = F.normalize(direction.to(dev, torch.float32), dim=0)
    helper = torch.tensor([1.0, 0.0, 0.0] if abs(float(d[0])) < 0.9 else [0.0, 1.0, 0.0], device=dev)
    u = F.normalize(torch.linalg.cross(d, helper), dim=0)
    v = torch.linalg.cross(d, u)
    s = torch.linspace(-half, half, n_rays, device=dev)
    t = torch.linspace(-half, half, S, device=dev)
    origins = (s[:, None, None] * u + s[None, :, None] * v).reshape(-1, 1, 3)
    # grid_sample reads (x, y, z) as (W, H, D): put our x-major grid in [D, H, W] = [z, y, x] order.
    coords = ((origins + t[None, :, None] * d) / radius).reshape(1, -1, S, 1, 3)
    out = []
    for g in grids:
        vol = g.to(torch.float32).permute(2, 1, 0)[None, None]
        val = F.grid_sample(vol, coords, mode="bilinear", padding_mode="zeros", align_corners=True)
        out.append(val.reshape(-1, S).to(torch.float64))
    return out, step


def half_opacity_depth(extinction: Tensor, step: float) -> Tensor:
    """Rays [N, S] of extinction samples -> [N] sample position where the opacity reaches 50%.

    The optical depth is integrated with the trapezoid rule; rays that never get there give S - 1.
    """
    S = extinction.shape[1]
    seg = 0.5 * (extinction[:, 1:] + extinction[:, :-1]).clamp(min=0.0) * step  # [N, S-1]
    cum = torch.cumsum(seg, dim=-1)
    ln2 = math.log(2.0)
    reached = cum >= ln2
    any_hit = reached.any(-1)
    k = reached.to(torch.int8).argmax(-1)  # first segment where it is reached
    before = (cum - seg).gather(1, k[:, None])[:, 0]
    frac = ((ln2 - before) / seg.gather(1, k[:, None])[:, 0].clamp(min=1e-30)).clamp(0.0, 1.0)
    return torch.where(any_hit, k.to(cum.dtype) + frac, torch.full_like(frac, S - 1.0))


def first_crossing(values: Tensor, levels: Tensor) -> Tensor:
    """Rays [N, S], levels [K] -> [N, K] first (linearly interpolated) sample position above each level.

    Rays that never exceed a level give S - 1.
    """
    N, S = values.shape
    peak = torch.cummax(values, dim=-1).values.contiguous()  # sorted along each ray
    lv = levels.to(values)[None].expand(N, -1).contiguous()
    i = torch.searchsorted(peak, lv, right=True)  # first sample whose running max exceeds the level
    ic = i.clamp(1, S - 1)
    v1, v0 = values.gather(1, ic), values.gather(1, ic - 1)
    t = (ic - 1).to(values.dtype) + ((lv - v0) / (v1 - v0).clamp(min=1e-30)).clamp(0.0, 1.0)
    t = torch.where(i == 0, torch.zeros_like(t), t)
    return torch.where(i >= S, torch.full_like(t, S - 1.0), t)


def opacity_matched_level(field: Tensor, extinction: Tensor, radius: float, n_views: int = AUTO_VIEWS,
                          n_rays: int = AUTO_RAYS, n_levels: int = AUTO_LEVELS) -> float:
    """The level of ``field`` [R, R, R] whose surface best matches where the field renders opaque.

    ``extinction`` [R, R, R] is what the renderer integrates (the density itself for a NeRF; for
    Gaussians an extinction with the same footprints). Along orthographic rays from
    ``n_views`` directions, the rendered surface is where the opacity ``1 - exp(-int extinction)``
    reaches 50%; the surface of a level is where the ray first exceeds it. The level minimising
    the mean distance between the two (a ray that only one of them hits counts the distance to
    the far end, so silhouettes weigh in too) is returned; it lies strictly inside the field's
    range, so its surface is never empty. A non-finite field gives NaN (marching cubes reports it).
    """
    f = field.detach().to(torch.float64)
    if not bool(torch.isfinite(f).all()) or not bool(torch.isfinite(extinction).all()):
        return float("nan")
    lo, hi = float(f.min()), float(f.max())
    if not hi > lo:
        return hi
    floor = max(lo, hi * 1e-6) if hi > 0 else lo
    if floor > 0:
        levels = torch.logspace(math.log10(floor), math.log10(hi), n_levels + 2, dtype=torch.float64)[1:-1]
    else:
        levels = torch.linspace(floor, hi, n_levels + 2, dtype=torch.float64)[1:-1]
    levels = levels.to(f.device)
    err = torch.zeros(n_levels, dtype=torch.float64, device=f.device)
    for direction in sphere_directions(n_views):
        (v, e), step = sample_orthographic([f, extinction.detach()], radius, direction, n_rays)
        err += (first_crossing(v, levels) - half_opacity_depth(e, step)[:, None]).abs().sum(0)
    return float(levels[int(err.argmin())])


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
