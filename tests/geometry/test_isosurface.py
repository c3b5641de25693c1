from __future__ import annotations

import pytest
import torch

from lift3d.geometry.base import IsosurfaceError
from lift3d.geometry.isosurface import fill_cavities, grid_points, marching_cubes_grid


def test_sphere_surface_is_outward_and_on_the_radius():
    m = marching_cubes_grid(grid_points(40, 1.0).norm(dim=-1) - 0.5, 1.0)
    assert (m.v_pos.norm(dim=-1) - 0.5).abs().max() < 0.02
    centroids = m.v_pos[m.t_pos_idx].mean(1)
    assert ((m.face_normals() * centroids).sum(-1) > 0).all()


def test_empty_field_is_a_clear_error():
    with pytest.raises(IsosurfaceError, match=r"everywhere outside .*threshold"):
        marching_cubes_grid(torch.ones(16, 16, 16), 1.0)
    with pytest.raises(IsosurfaceError, match="NaN"):
        marching_cubes_grid(torch.full((16, 16, 16), float("nan")), 1.0)


def test_hollow_shell_is_filled_but_open_regions_are_not():
    r = grid_points(40, 1.0).norm(dim=-1)
    shell = torch.where((r > 0.4) & (r < 0.5), -torch.ones_like(r), torch.ones_like(r))  # inside only on the shell
    filled = fill_cavities(shell)
    assert (filled[r < 0.4] < 0).all() and (filled[r > 0.5] > 0).all()
    m = marching_cubes_grid(filled, 1.0)
    assert (m.v_pos.norm(dim=-1) > 0.45).all()  # no inner surface left
    # A cup open to the outside keeps its opening.
    cup = shell.clone()
    cup[(r < 0.5) & (grid_points(40, 1.0)[..., 2] > 0.2)] = 1.0
    assert (fill_cavities(cup)[(r < 0.35) & (grid_points(40, 1.0)[..., 2] > 0.25)] > 0).all()
