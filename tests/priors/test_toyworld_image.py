"""Toy-world input images for image-to-3D: exact renders as straight-alpha RGBA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lift3d.priors.toyworld.data import AMBIENT, DIFFUSE
from lift3d.priors.toyworld.image import light_direction, render_rgba, save_rgba
from lift3d.priors.toyworld.render import render
from lift3d.priors.toyworld.shapes import get_object
from lift3d.utils.cameras import make_cameras


def test_alpha_is_zero_at_the_corners_and_covers_the_object():
    a = render_rgba("a red cube", elevation_deg=20.0, azimuth_deg=30.0, resolution=32, supersample=2)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 4)
    for y, x in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert a[y, x, 3] == 0 and (a[y, x, :3] == 0).all()
    assert a[16, 16, 3] == 255
    # Coverage equals the renderer's mask, and partial coverage exists only on the silhouette.
    t = lambda v: torch.tensor([v])  # noqa: E731
    cams = make_cameras(t(20.0), t(30.0), t(2.0), t(40.0), 32, 32)
    mask = render(get_object("a red cube"), cams, supersample=2)["mask"][0, ..., 0].numpy()
    assert np.abs(a[..., 3] / 255.0 - mask).max() <= 0.5 / 255 + 1e-6
    partial = (a[..., 3] > 0) & (a[..., 3] < 255)
    assert 0 < partial.sum() < (a[..., 3] == 255).sum()


def test_red_cube_is_red_and_shaded_like_the_training_data():
    a = render_rgba("a red cube", elevation_deg=20.0, azimuth_deg=30.0, resolution=24)
    inside = a[..., 3] == 255
    rgb = a[..., :3][inside].astype(float)
    assert (rgb[:, 0] > 2 * rgb[:, 1]).all() and (rgb[:, 0] > 2 * rgb[:, 2]).all()
    # Straight colour times coverage over black is the renderer's image with the same light.
    t = lambda v: torch.tensor([v])  # noqa: E731
    cams = make_cameras(t(20.0), t(30.0), t(2.0), t(40.0), 24, 24)
    ref = render(get_object("a red cube"), cams, light_direction(cams, "above"), ambient=AMBIENT, diffuse=DIFFUSE,
                 supersample=2)["rgb"][0].numpy()
    premult = a[..., :3] / 255.0 * (a[..., 3:] / 255.0)
    assert np.abs(premult - ref).max() < 2.5 / 255
    # Two faces of the cube face the light differently: Lambertian shading, not flat albedo.
    assert rgb[:, 0].max() - rgb[:, 0].min() > 20


def test_camera_moves_the_object_view():
    front = render_rgba("a snowman", azimuth_deg=0.0, resolution=24)
    side = render_rgba("a snowman", azimuth_deg=90.0, resolution=24)
    assert not np.array_equal(front, side)
    far = render_rgba("a red sphere", distance=4.0, resolution=24)
    near = render_rgba("a red sphere", distance=2.0, resolution=24)
    assert far[..., 3].sum() < 0.5 * near[..., 3].sum()


def test_lights_and_errors():
    head = render_rgba("a blue sphere", resolution=16, light="headlight")
    above = render_rgba("a blue sphere", resolution=16, light=[0.0, 0.0, 1.0])
    assert not np.array_equal(head[..., :3], above[..., :3])
    assert np.array_equal(head[..., 3], above[..., 3])
    with pytest.raises(ValueError, match="headlight"):
        render_rgba("a blue sphere", resolution=8, light="sun")
    with pytest.raises(ValueError, match="Valid prompts"):
        render_rgba("a pink cube", resolution=8)


def test_save_rgba_writes_a_png_that_reads_back(tmp_path):
    import imageio.v3 as iio

    p = save_rgba(tmp_path / "sub" / "cube.png", "a green cylinder", resolution=16, elevation_deg=10.0)
    back = iio.imread(p)
    assert back.shape == (16, 16, 4)
    assert np.array_equal(back, render_rgba("a green cylinder", resolution=16, elevation_deg=10.0))
