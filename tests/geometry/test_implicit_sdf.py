"""implicit-sdf: sphere bias, normals, eikonal gradients, shape initialisation (sphere and mesh)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lift3d.geometry.implicit_sdf import ellipsoid_sdf, winding_numbers
from lift3d.registry import find


SMALL = {"pos_encoding_config": {"n_levels": 6, "log2_hashmap_size": 12, "base_resolution": 8},
         "backend": "torch"}


def make(**over):
    torch.manual_seed(0)
    return find("implicit-sdf")({**SMALL, **over})


@pytest.mark.parametrize("normal_type", ["finite_difference", "analytic"])
def test_sphere_bias_gives_sphere_sdf_and_radial_normals(normal_type):
    g = make(sdf_bias="sphere", sdf_bias_params=0.5, normal_type=normal_type)
    p = torch.randn(50, 3) * 0.4
    out = g(p, output_normal=True)
    torch.testing.assert_close(out["sdf"][:, 0], p.norm(dim=-1) - 0.5, atol=1e-3, rtol=0)
    assert (out["normal"] * F.normalize(p, dim=-1)).sum(-1).min() > 0.99
    torch.testing.assert_close(out["sdf_grad"].norm(dim=-1), torch.ones(50), atol=2e-2, rtol=0)


def test_isosurface_is_outward_sphere():
    g = make(sdf_bias="sphere", sdf_bias_params=0.6, isosurface_resolution=32)
    mesh = g.isosurface()
    r = mesh.v_pos.norm(dim=-1)
    assert abs(float(r.mean()) - 0.6) < 0.01
    centroids = mesh.v_pos[mesh.t_pos_idx].mean(1)
    assert (mesh.face_normals() * F.normalize(centroids, dim=-1)).sum(-1).min() > 0.5


def test_auto_threshold_rules():
    g = make()
    assert g.resolve_threshold(torch.tensor([-1.0, 2.0])) == 0.0
    assert abs(g.resolve_threshold(torch.tensor([1.0, 3.0])) - 2.0) < 1e-6
    lv = g.forward_level(torch.tensor([[1.0], [3.0]]))
    assert lv[0, 0] < 0 < lv[1, 0]


def test_eikonal_second_order_reaches_the_table():
    g = make(sdf_bias="sphere", normal_type="analytic")
    out = g(torch.rand(64, 3) - 0.5, output_normal=True)
    loss = ((out["sdf_grad"].norm(dim=-1) - 1.0) ** 2).mean() + out["sdf"].abs().mean()
    loss.backward()
    assert g.encoding.embeddings.grad.abs().sum() > 0


def test_ellipsoid_sdf_sign_and_scale():
    radii = torch.tensor([0.5, 0.3, 0.2])
    p = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.4]])
    d = ellipsoid_sdf(p, radii)[:, 0]
    assert d[0] < 0 and abs(float(d[1])) < 1e-6 and abs(float(d[2]) - 0.2) < 0.02


def test_winding_numbers_of_a_cube():
    import trimesh

    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    tri = torch.as_tensor(box.vertices[box.faces], dtype=torch.float32)
    w = winding_numbers(torch.tensor([[0.0, 0.0, 0.0], [0.4, -0.3, 0.2], [0.9, 0.0, 0.0], [0.0, 2.0, 0.0]]), tri)
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 0.0, 0.0]), atol=1e-4, rtol=0)


def test_shape_init_sphere():
    g = make(shape_init="sphere", shape_init_params=0.4, shape_init_steps=150, shape_init_points=2048,
             shape_init_lr=1e-2, isosurface_resolution=32)
    r = g.isosurface().v_pos.norm(dim=-1)
    assert abs(float(r.mean()) - 0.4) < 0.03 and float(r.std()) < 0.03


def test_shape_init_from_mesh_file(tmp_path):
    import trimesh

    path = tmp_path / "ball.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=3.0).export(path)  # rescaled to 0.5 * radius
    g = make(shape_init=f"mesh:{path}", shape_init_params=0.5, shape_init_steps=150, shape_init_points=2048,
             shape_init_lr=1e-2, isosurface_resolution=32, shape_init_mesh_resolution=24)
    r = g.isosurface().v_pos.norm(dim=-1)
    assert abs(float(r.mean()) - 0.5) < 0.04
