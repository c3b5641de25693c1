"""3DGS PLY layout: writer/reader round trip, header order, geometry export/load, plain point clouds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lift3d.geometry.gaussian_strategy import PARAM_NAMES
from lift3d.geometry.gaussians import GaussianModel
from lift3d.utils.gaussian_ply import gaussian_ply_fields, read_gaussian_ply, read_ply_vertices, write_gaussian_ply


def _random(n, k, seed=0):
    r = np.random.default_rng(seed)
    return {
        "xyz": r.normal(size=(n, 3)).astype(np.float32),
        "f_dc": r.normal(size=(n, 3)).astype(np.float32),
        "f_rest": r.normal(size=(n, k, 3)).astype(np.float32),
        "opacity": r.normal(size=(n, 1)).astype(np.float32),
        "scale": r.normal(size=(n, 3)).astype(np.float32),
        "rotation": r.normal(size=(n, 4)).astype(np.float32),
    }


@pytest.mark.parametrize("k", [0, 3, 15])
def test_round_trip(tmp_path, k):
    g = _random(57, k)
    path = tmp_path / "g.ply"
    write_gaussian_ply(path, g["xyz"], g["f_dc"], g["f_rest"], g["opacity"], g["scale"], g["rotation"])
    back = read_gaussian_ply(path)
    for key, val in g.items():
        np.testing.assert_array_equal(back[key], val, err_msg=key)
    assert path.stat().st_size == len(path.read_bytes().split(b"end_header\n")[0]) + len("end_header\n") + 57 * 4 * (
        17 + 3 * k)


def test_header_is_the_3dgs_layout(tmp_path):
    g = _random(4, 3)
    path = tmp_path / "g.ply"
    write_gaussian_ply(path, g["xyz"], g["f_dc"], g["f_rest"], g["opacity"], g["scale"], g["rotation"])
    header = path.read_bytes().split(b"end_header\n")[0].decode().splitlines()
    assert header[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 4"]
    props = [h.split()[-1] for h in header if h.startswith("property float")]
    assert props == gaussian_ply_fields(3)
    assert props[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert props[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    v = read_ply_vertices(path)
    # f_rest is channel-major: f_rest_0..2 are the red coefficients of degree 1, f_rest_3.. the green ones.
    np.testing.assert_array_equal(v["f_rest_1"], g["f_rest"][:, 1, 0])
    np.testing.assert_array_equal(v["f_rest_3"], g["f_rest"][:, 0, 1])
    np.testing.assert_array_equal(v["nx"], 0)


def test_geometry_export_then_init_from_ply(tmp_path):
    a = GaussianModel({"init": "ball:0.5", "n_init": 80, "seed": 0, "sh_degree": 1})
    with torch.no_grad():
        a.features_rest.normal_()
    path = tmp_path / "point_cloud.ply"
    a.export_ply(path)
    b = GaussianModel({"init": f"ply:{path}", "sh_degree": 1})
    for n in PARAM_NAMES:
        torch.testing.assert_close(getattr(b, n), getattr(a, n), rtol=0, atol=0)


def test_init_from_plain_ascii_point_cloud(tmp_path):
    path = tmp_path / "pc.ply"
    lines = ["ply", "format ascii 1.0", "comment made by a test", "element vertex 3", "property float x",
             "property float y", "property float z", "property uchar red", "property uchar green",
             "property uchar blue", "element face 0", "property list uchar int vertex_indices", "end_header",
             "0 0 0 255 0 0", "0.5 0 0 0 255 0", "0 0.5 0.25 0 0 255"]
    path.write_text("\n".join(lines) + "\n")
    geo = GaussianModel({"init": f"ply:{path}"})
    torch.testing.assert_close(geo.xyz.detach(), torch.tensor([[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0.25]]))
    torch.testing.assert_close(geo.base_colors().detach(), torch.eye(3), atol=1e-5, rtol=0)


def test_reader_rejects_non_gaussian_ply(tmp_path):
    path = tmp_path / "pc.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                    "property float z\nend_header\n0 0 0\n")
    with pytest.raises(ValueError, match="not a 3D Gaussian PLY"):
        read_gaussian_ply(path)
