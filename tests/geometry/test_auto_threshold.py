"""The ``auto`` isosurface level of density fields (NeRF, Gaussians) and the hidden-interior fill.

``auto`` picks the level whose surface matches where the field renders 50% opacity. The scenes
here have a known rendered surface and a few very dense spots inside, which is what made the
former rules (the mean density; half the median density at opaque Gaussians) land deep inside.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lift3d.geometry.gaussians import GaussianModel
from lift3d.geometry.isosurface import (fill_cavities, fill_hidden, first_crossing, grid_points, half_opacity_depth,
                                        marching_cubes_grid, opacity_matched_level)
from lift3d.registry import find


# ------------------------------------------------------------------------------------------------
# Building blocks


def test_half_opacity_depth_of_constant_extinction():
    S, step = 50, 0.02
    ext = torch.zeros(3, S, dtype=torch.float64)
    ext[0, 10:] = 5.0  # opacity 50% after ln 2 / 5 = 0.1386 past sample 10 (6.93 samples)
    ext[1, 30:] = 200.0  # very dense: within the first step
    # ray 2 stays empty
    t = half_opacity_depth(ext, step)
    # The trapezoid ramps from 0 at sample 9 to 5 at sample 10: half a segment of optical depth 0.05.
    expect0 = 10 + (math.log(2.0) - 0.5 * 5.0 * step) / (5.0 * step)
    assert t[0].item() == pytest.approx(expect0, abs=1e-9)
    assert 29.0 < t[1].item() < 30.0
    assert t[2].item() == S - 1


def test_first_crossing_interpolates_and_reports_misses():
    vals = torch.tensor([[0.0, 1.0, 3.0, 2.0, 5.0], [0.0, 0.5, 0.2, 0.1, 0.0]], dtype=torch.float64)
    t = first_crossing(vals, torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64))
    assert t[0].tolist() == pytest.approx([0.5, 1.5, 3 + 2 / 3])  # 4.0: past the dip, between 2 and 5
    assert t[1, 1].item() == 4 and t[1, 2].item() == 4  # never above: the far end


def leaky_shell(R=40):
    """A thick shell (0.35 < r < 0.5, density 50) with a pinhole through its wall on +x, empty inside."""
    p = grid_points(R, 1.0)
    r = p.norm(dim=-1)
    dens = torch.where((r > 0.35) & (r < 0.5), torch.full_like(r, 50.0), torch.zeros_like(r))
    hole = (p[..., 1].abs() < 0.04) & (p[..., 2].abs() < 0.04) & (p[..., 0] > 0)
    dens[hole] = 0.0
    return p, r, dens


def test_fill_hidden_fills_a_leaky_shell_but_keeps_open_space():
    R = 40
    p, r, dens = leaky_shell(R)
    level = fill_cavities(25.0 - dens)
    interior = r < 0.3
    # The pinhole connects the cavity to the outside: flood filling cannot close it...
    assert (level[interior] < 0).float().mean() < 0.05
    filled = fill_hidden(level, dens, 2.0 / (R - 1))
    # ...but no axis direction sees the interior through less than 50% opacity, except along the
    # straight line through the hole.
    on_hole_line = (p[..., 1].abs() < 0.04) & (p[..., 2].abs() < 0.04)
    assert (filled[interior & ~on_hole_line] < 0).all()
    assert (filled[r > 0.55] > 0).all()  # open space stays outside
    assert torch.equal(filled[dens > 25.0], level[dens > 25.0])  # inside stays as it was
    # Only what lies behind the inside is filled: an empty level set stays empty (a threshold above
    # the field keeps failing loudly in marching cubes), however opaque the field.
    assert torch.equal(fill_hidden(60.0 - dens, dens, 2.0 / (R - 1)), 60.0 - dens)
    # A shell seen through its transparent side stays open: with no extinction nothing is hidden.
    assert torch.equal(fill_hidden(level, torch.zeros_like(dens), 2.0 / (R - 1)), level)


# ------------------------------------------------------------------------------------------------
# NeRF: a hollow shell with a dense speck at its centre


SHELL_PEAK, SHELL_EDGE, CORE_PEAK = 40.0, 0.01, 2.0e5


def shell_density(points):
    r = points.norm(dim=-1, keepdim=True)
    shell = SHELL_PEAK * torch.sigmoid((0.5 - r) / SHELL_EDGE) * torch.sigmoid((r - 0.3) / SHELL_EDGE)
    core = CORE_PEAK * torch.sigmoid((0.08 - r) / 0.005)  # a tiny, very dense speck, as trained NeRFs have
    return shell + core


def shell_volume(**cfg):
    base = {"radius": 0.8, "isosurface_resolution": 48, "backend": "torch",
            "pos_encoding_config": {"n_levels": 2, "log2_hashmap_size": 8, "base_resolution": 4}}
    base.update(cfg)
    geo = find("implicit-volume")(base)
    geo.forward_field = shell_density  # the analytic field replaces the network for extraction
    return geo


def silhouette_radius():
    """Distance from the centre at which a ray passing by renders 50% opacity (fine quadrature)."""
    s = torch.linspace(-0.8, 0.8, 8001, dtype=torch.float64)
    b = torch.linspace(0.45, 0.6, 1501, dtype=torch.float64)
    pts = torch.stack([b[:, None].expand(-1, s.numel()), s[None].expand(b.numel(), -1), torch.zeros(b.numel(), s.numel(),
                       dtype=torch.float64)], -1)
    depth = shell_density(pts)[..., 0].sum(-1) * (s[1] - s[0])  # [B] optical depth of each passing ray
    return float(b[int((depth >= math.log(2.0)).nonzero().max())])


def test_nerf_auto_level_recovers_the_rendered_surface_where_the_mean_fails():
    # The soft edge renders a silhouette a little outside r = 0.5: the surface the auto level must give.
    b50 = silhouette_radius()
    assert 0.51 < b50 < 0.53
    geo = shell_volume(isosurface_threshold="auto")
    radii = geo.isosurface().v_pos.norm(dim=-1)
    assert abs(radii.mean().item() - b50) < 0.01 and radii.std().item() < 0.01
    assert radii.min().item() > 0.45  # one surface: the hollow inside and the speck are filled

    # The former rule (the mean density) with the former extraction (flood fill only): the speck
    # pulls the mean above the shell, and only the speck is left.
    field = geo._eval_grid_field(48)
    mean = float(field.mean())
    assert mean > SHELL_PEAK
    old = marching_cubes_grid(fill_cavities(mean - field), 0.8)
    assert old.v_pos.norm(dim=-1).max().item() < 0.15


def test_nerf_auto_level_ignores_grid_layout_of_other_callers():
    # A DMTet conversion passes its own grid, flattened: auto then uses the field's own grid.
    geo = shell_volume(isosurface_threshold="auto", isosurface_resolution=32)
    own = geo.resolve_threshold(geo._eval_grid_field(32))
    flat = torch.rand(1000, 1)
    assert geo.resolve_threshold(flat) == pytest.approx(own)
    lvl = geo.forward_level(shell_density(torch.tensor([[0.0, 0.0, 0.4], [0.0, 0.0, 0.7]])))
    assert lvl[0, 0] < 0 < lvl[1, 0]


def test_opacity_matched_level_edge_cases():
    const = torch.full((8, 8, 8), 3.0)
    assert opacity_matched_level(const, const, 1.0) == 3.0  # nothing to choose
    bad = const.clone()
    bad[0, 0, 0] = float("nan")
    assert math.isnan(opacity_matched_level(bad, bad, 1.0))
    # A faint field never reaches 50% opacity: the level still leaves a (small) surface.
    r = grid_points(24, 1.0).norm(dim=-1)
    faint = 0.5 * torch.exp(-((r / 0.3) ** 2))
    lvl = opacity_matched_level(faint, faint, 1.0)
    assert float(faint.min()) < lvl < float(faint.max())
    marching_cubes_grid(lvl - faint, 1.0)


# ------------------------------------------------------------------------------------------------
# Gaussians: a shell of Gaussians on a sphere with a dense, opaque clump inside


def shell_and_clump():
    g = torch.Generator().manual_seed(0)
    shell = F.normalize(torch.randn(2500, 3, generator=g), dim=-1) * 0.5
    clump = F.normalize(torch.randn(1500, 3, generator=g), dim=-1) * 0.15 * torch.rand(1500, 1, generator=g) ** (1 / 3)
    geo = GaussianModel({"init": "points", "init_scale": 0.03, "radius": 0.8, "isosurface_resolution": 48,
                         "density_thresh": "auto"}, init_points=torch.cat([shell, clump]))
    with torch.no_grad():
        op = torch.cat([torch.full((2500,), 0.45), torch.full((1500,), 0.95)])
        geo.opacity.copy_(torch.logit(op)[:, None])
    return geo


def test_gaussian_auto_level_finds_the_shell_where_the_old_rule_fails():
    from lift3d.utils.cameras import focal_from_fovy, make_cameras

    geo = shell_and_clump()
    # The silhouette the splatting renderer draws (three views; a disc of the same size in each).
    H, dist = 96, 3.0
    cams = make_cameras(torch.tensor([10.0, -30.0, 60.0]), torch.tensor([0.0, 100.0, 220.0]), torch.full((3,), dist),
                        torch.full((3,), 30.0), H, H)
    rend = find("gaussian-splatting-renderer", "renderer")({"backend": "torch"}, geometry=geo, material=None,
                                                            background=None)
    with torch.no_grad():
        disc = (rend(**cams, bg_color=torch.zeros(3))["opacity"][..., 0] > 0.5).float().sum((1, 2))
    f = float(focal_from_fovy(torch.tensor([30.0]), H)[0])
    rendered = dist * torch.sin(torch.atan(torch.sqrt(disc / math.pi) / f))  # sphere radius seen as that disc
    assert rendered.max() - rendered.min() < 0.01 and 0.52 < rendered.mean() < 0.6

    radii = geo.isosurface().v_pos.norm(dim=-1)
    outer = radii[radii > 0.5]  # the outer face of the shell (the inner face and the clump lie inside)
    assert outer.numel() > 500 and abs(outer.mean().item() - rendered.mean().item()) < 0.015

    # The former rule: half the median density at the centres of Gaussians with opacity > 0.5,
    # which are all in the clump.
    with torch.no_grad():
        sel = geo.get_opacity.squeeze(-1) > 0.5
        old = 0.5 * float(geo.density(geo.xyz[sel]).median())
    geo.cfg.density_thresh = old
    geo.cfg.isosurface_fill = False  # the level set itself (filling would grow it into the hidden space)
    assert geo.isosurface().v_pos.norm(dim=-1).max().item() < 0.3  # the shell is gone


def _inner_area(mesh, radius: float = 0.35) -> float:
    """Surface area of the faces whose centre lies within ``radius`` of the origin."""
    v, f = mesh.v_pos.detach(), mesh.t_pos_idx.long()
    tri = v[f]
    area = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1) / 2
    return area[tri.mean(1).norm(dim=-1) < radius].sum().item()


def test_nerf_to_dmtet_conversion_fills_a_leaky_shell():
    """Magic3D's switch: a hollow NeRF shell with a pinhole (a spot no camera saw) converts like the
    NeRF's own isosurface (solid but for the straight tunnel through the hole), not to a shell with
    its whole inner surface (what flood-filling alone gives: 4 pi 0.3^2 = 1.13 of inner area)."""
    def leaky(points):
        d = shell_density(points)
        off_axis = points[..., 1:] - torch.tensor([0.2, 0.0], dtype=points.dtype)  # the hole misses the speck
        hole = (off_axis.norm(dim=-1, keepdim=True) < 0.06) & (points[..., :1] > 0)
        return torch.where(hole, torch.zeros_like(d), d)

    geo = shell_volume(isosurface_threshold=1.0)
    geo.forward_field = leaky
    hollow = marching_cubes_grid(fill_cavities(1.0 - geo._eval_grid_field(48)), 0.8)
    assert _inner_area(hollow) > 1.0
    nerf = _inner_area(geo.isosurface())
    assert nerf < 0.3
    dmtet = find("tetrahedra-sdf-grid").create_from(geo, {"isosurface_resolution": 48, "n_feature_dims": 3,
                                                          "feature_fit_steps": 0})
    assert _inner_area(dmtet.isosurface()) < 0.3
