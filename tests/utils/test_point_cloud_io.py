"""Plain PLY point clouds: round trip, colour quantisation, foreign files, and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lift3d.utils.gaussian_ply import read_ply_vertices
from lift3d.utils.point_cloud_io import read_point_cloud_ply, write_point_cloud_ply


def test_round_trip_positions_exact_colours_to_8_bits(tmp_path):
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(50, 3)).astype(np.float32)
    rgb = rng.uniform(size=(50, 3)).astype(np.float32)
    path = write_point_cloud_ply(tmp_path / "sub" / "c.ply", xyz, rgb)
    xyz2, rgb2 = read_point_cloud_ply(path)
    assert xyz2.shape == (50, 3) and rgb2.shape == (50, 3)
    np.testing.assert_array_equal(xyz2, xyz)
    assert np.abs(rgb2 - rgb).max() <= 0.5 / 255 + 1e-6


def test_layout_is_float_xyz_and_uchar_rgb(tmp_path):
    path = write_point_cloud_ply(tmp_path / "c.ply", torch.zeros(3, 3), torch.tensor([[0.0, 0.5, 1.0]] * 3))
    header = path.read_bytes().split(b"end_header\n")[0].decode()
    assert "property float x" in header and "property uchar red" in header and "element vertex 3" in header
    v = read_ply_vertices(path)
    assert v["red"].dtype == np.uint8 and v["x"].dtype == np.float32
    assert (v["red"][0], v["green"][0], v["blue"][0]) == (0, 128, 255)


def test_out_of_range_colours_are_clipped_and_missing_colours_grey(tmp_path):
    path = write_point_cloud_ply(tmp_path / "c.ply", np.zeros((2, 3)), np.array([[-1.0, 2.0, 0.5], [0, 0, 0]]))
    _, rgb = read_point_cloud_ply(path)
    assert rgb[0, 0] == 0.0 and rgb[0, 1] == 1.0
    _, grey = read_point_cloud_ply(write_point_cloud_ply(tmp_path / "g.ply", np.zeros((4, 3))))
    np.testing.assert_allclose(grey, 128 / 255)


def test_reads_an_ascii_file_without_colours_and_float_colours(tmp_path):
    p = tmp_path / "a.ply"
    p.write_text("ply\nformat ascii 1.0\nelement vertex 2\nproperty double x\nproperty double y\nproperty double z\n"
                 "end_header\n1 2 3\n4 5 6\n")
    xyz, rgb = read_point_cloud_ply(p)
    np.testing.assert_array_equal(xyz, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_allclose(rgb, 0.5)
    q = tmp_path / "f.ply"
    q.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\nproperty float z\n"
                 "property float red\nproperty float green\nproperty float blue\nend_header\n0 0 0 0.25 0.5 1.5\n")
    _, rgb = read_point_cloud_ply(q)
    np.testing.assert_allclose(rgb, [[0.25, 0.5, 1.0]])


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        write_point_cloud_ply(tmp_path / "x.ply", np.zeros((4, 2)))
    with pytest.raises(ValueError, match="rgb"):
        write_point_cloud_ply(tmp_path / "x.ply", np.zeros((4, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        write_point_cloud_ply(tmp_path / "x.ply", np.full((1, 3), np.nan))
    with pytest.raises(FileNotFoundError, match="nope.ply"):
        read_point_cloud_ply(tmp_path / "nope.ply")
    p = tmp_path / "n.ply"
    p.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float a\nend_header\n1\n")
    with pytest.raises(ValueError, match="lacks x, y, z"):
        read_point_cloud_ply(p)
