from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from lift3d.geometry.isosurface import grid_points, marching_cubes_grid
from lift3d.priors.toyworld.metrics import score_mesh
from lift3d.priors.toyworld.shapes import get_object


def _gt_mesh(obj, turn: bool = False, res: int = 64) -> trimesh.Trimesh:
    pts = grid_points(res, 0.72)
    if turn:  # the object turned 180 degrees about z: its Janus twin
        pts = pts * torch.tensor([-1.0, -1.0, 1.0])
    m = marching_cubes_grid(obj.sdf(pts), 0.72)
    tm = trimesh.Trimesh(m.v_pos.numpy(), m.t_pos_idx.numpy(), process=False)
    colours = (obj.albedo(m.v_pos * (torch.tensor([-1.0, -1.0, 1.0]) if turn else 1.0)).numpy() * 255).astype(np.uint8)
    tm.visual = trimesh.visual.ColorVisuals(tm, vertex_colors=colours)
    return tm


def test_the_true_surface_scores_near_perfect():
    obj = get_object("a red cube")
    s = score_mesh(_gt_mesh(obj), obj, resolution=32, n_points=4000)
    assert s.iou > 0.95 and s.chamfer < 0.01 and s.colour_error < 0.02
    assert s.front_ok is None  # primitives have no front


def test_a_wrong_shape_and_colour_score_worse():
    obj = get_object("a red cube")
    s = score_mesh(_gt_mesh(get_object("a blue sphere")), obj, resolution=32, n_points=4000)
    assert s.iou < 0.8 and s.chamfer > 0.03 and s.colour_error > 0.3


@pytest.mark.parametrize("prompt", ["a snowman", "a chair", "a mug"])
def test_front_check_passes_the_object_and_fails_its_janus_twin(prompt):
    obj = get_object(prompt)
    right = score_mesh(_gt_mesh(obj), obj, resolution=48, n_points=2000)
    twin = score_mesh(_gt_mesh(obj, turn=True), obj, resolution=48, n_points=2000)
    assert right.front_ok and not twin.front_ok
    assert right.front_margin > twin.front_margin
    assert right.chamfer < 0.02 and right.colour_error < 0.05  # finite, even where the SDF has creases
