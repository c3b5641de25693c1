"""Fixed-mesh geometry: loading, normalisation, y-up conversion, errors, feature field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from lift3d.registry import find



def _box(tmp_path, name, extents, offset=(0.0, 0.0, 0.0)):
    m = trimesh.creation.box(extents)
    m.apply_translation(offset)
    path = tmp_path / name
    m.export(str(path))
    return path


def test_obj_is_centred_and_scaled_into_radius(tmp_path):
    path = _box(tmp_path, "b.obj", (2.0, 1.0, 4.0), offset=(5.0, -3.0, 1.0))
    geo = find("mesh", "geometry")({"mesh_path": str(path), "radius": 2.0, "normalize_scale": 0.5})
    mesh = geo.isosurface()
    lo, hi = mesh.v_pos.amin(0), mesh.v_pos.amax(0)
    assert torch.allclose((lo + hi) / 2, torch.zeros(3), atol=1e-6)
    # Largest half-extent (z: 2.0) becomes 0.5 * radius = 1.0; proportions kept, +z stays up.
    assert torch.allclose(hi, torch.tensor([0.5, 0.25, 1.0]), atol=1e-6)
    assert mesh.n_faces == 12


def test_unnormalised_keeps_coordinates(tmp_path):
    path = _box(tmp_path, "b.ply", (1.0, 1.0, 1.0), offset=(0.1, 0.0, 0.0))
    geo = find("mesh")({"mesh_path": str(path), "normalize": False})
    assert geo.isosurface().v_pos[:, 0].max().item() == pytest.approx(0.6, abs=1e-6)


def test_glb_is_converted_from_y_up(tmp_path):
    # Long along y in the file: glTF's up. In lift3d's frame that must become +z.
    path = _box(tmp_path, "b.glb", (0.2, 1.0, 0.4))
    geo = find("mesh")({"mesh_path": str(path), "normalize": False})
    ext = geo.isosurface().v_pos.amax(0) - geo.isosurface().v_pos.amin(0)
    assert torch.allclose(ext, torch.tensor([0.2, 0.4, 1.0]), atol=1e-5)
    geo_raw = find("mesh")({"mesh_path": str(path), "normalize": False, "up_axis": "+z"})
    ext_raw = geo_raw.isosurface().v_pos.amax(0) - geo_raw.isosurface().v_pos.amin(0)
    assert torch.allclose(ext_raw, torch.tensor([0.2, 1.0, 0.4]), atol=1e-5)
    # A rotation, not a reflection: outward faces stay outward (positive volume).
    m = geo.isosurface()
    tri = m.v_pos[m.t_pos_idx]
    vol = (tri[:, 0] * torch.cross(tri[:, 1], tri[:, 2], dim=-1)).sum() / 6
    assert vol.item() == pytest.approx(0.2 * 1.0 * 0.4, rel=1e-4)


def test_clear_errors(tmp_path):
    G = find("mesh")
    missing = tmp_path / "nope.obj"
    with pytest.raises(FileNotFoundError, match="nope.obj"):
        G({"mesh_path": str(missing)})
    with pytest.raises(ValueError, match="mesh_path"):
        G({})
    pc = tmp_path / "points.ply"
    trimesh.PointCloud(np.random.rand(10, 3)).export(str(pc))
    with pytest.raises(ValueError, match="no triangle faces"):
        G({"mesh_path": str(pc)})


def test_feature_field_is_learnable(tmp_path):
    path = _box(tmp_path, "b.obj", (1.0, 1.0, 1.0))
    geo = find("mesh")({"mesh_path": str(path), "n_feature_dims": 5})
    pts = torch.rand(64, 3) - 0.5
    feats = geo.export_attributes(pts)["features"]
    assert feats.shape == (64, 5)
    target = torch.rand(64, 5)
    opt = torch.optim.Adam(geo.parameters(), lr=1e-2)
    loss0 = (geo.export_attributes(pts)["features"] - target).square().mean().item()
    for _ in range(60):
        loss = (geo.export_attributes(pts)["features"] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * loss0
    # Vertices are a fixed buffer, not a parameter.
    assert all(p.data_ptr() != geo.v_pos.data_ptr() for p in geo.parameters())
