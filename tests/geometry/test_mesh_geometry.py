"""Fixed-mesh geometry: loading, normalisation, y-up conversion, errors, feature field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from lift3d.registry import find
from lift3d.utils.cameras import make_cameras
from lift3d.utils.mesh import Mesh


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
    # Without a file the geometry may still be built (its mesh comes from a checkpoint or create_from);
    # using it before then names what is missing.
    with pytest.raises(ValueError, match="mesh_path"):
        G({}).isosurface()
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


# ---------------------------------------------------------------------------------------------
# Conversion from other geometries and the UV texture (DreamGaussian's second stage)


def _gaussian_ball():
    """Gaussians filling a ball of radius 0.4: red where x > 0, blue where x < 0."""
    gen = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(2000, 3, generator=gen), dim=-1)
    pts = d * 0.4 * torch.rand(2000, 1, generator=gen) ** (1 / 3)
    cols = torch.where(pts[:, :1] > 0, torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.9]))
    cfg = {"radius": 0.8, "color_mode": "rgb", "init": "points", "init_scale": 0.04, "init_opacity": 0.9,
           "density_thresh": 0.5, "isosurface_resolution": 40}
    return find("gaussian-splatting")(cfg, init_points=pts, init_colors=cols)


def _check_sides(feats, v, lo=0.1):
    right, left = v[:, 0] > lo, v[:, 0] < -lo
    assert right.sum() > 20 and left.sum() > 20
    # Colours follow the source: red on +x, blue on -x (the texture blurs only near x = 0).
    assert (feats[right, 0] > 0.6).float().mean() > 0.95 and (feats[right, 2] < 0.4).float().mean() > 0.95
    assert (feats[left, 2] > 0.6).float().mean() > 0.95 and (feats[left, 0] < 0.4).float().mean() > 0.95


def test_create_from_gaussians_bakes_a_uv_texture():
    gs = _gaussian_ball()
    geo = find("mesh").create_from(gs, {"radius": 0.8, "texture": "uv", "texture_size": 64})
    mesh = geo.isosurface()
    ref = gs.isosurface()
    # The surface is the Gaussians' (re-indexed by the unwrap, never moved): the ball's boundary.
    torch.testing.assert_close(mesh.v_pos[mesh.t_pos_idx], ref.v_pos[ref.t_pos_idx])
    r = mesh.v_pos.norm(dim=-1)
    assert float(r.min()) > 0.3 and float(r.max()) < 0.5
    assert mesh.v_tex is not None and float(mesh.v_tex.min()) >= 0 and float(mesh.v_tex.max()) <= 1
    assert geo.texture.shape == (64, 64, 3) and geo.texture.requires_grad
    assert [n for n, _ in geo.named_parameters()] == ["texture"]  # only the texture trains
    # Sampled at each vertex's own UV (the rasterizer's path) and without UVs (nearest vertex).
    uv = torch.zeros(mesh.n_vertices, 2)
    uv[mesh.t_pos_idx.reshape(-1)] = mesh.v_tex[mesh.t_tex_idx.reshape(-1)]
    with torch.no_grad():
        at_uv = geo.export_attributes(mesh.v_pos, uv=uv)["features"]
        near = geo.export_attributes(mesh.v_pos)["features"]
    _check_sides(at_uv, mesh.v_pos)
    _check_sides(near, mesh.v_pos)
    # Seam vertices have a copy in each chart and may take the other copy's UV; colours still agree.
    assert (at_uv - near).abs().mean().item() < 0.05


@pytest.mark.parametrize("texture", ["field", "uv"])
def test_create_from_nerf_keeps_surface_and_colours(texture):
    torch.manual_seed(0)
    nerf = find("implicit-volume")({"radius": 0.8, "isosurface_resolution": 32, "isosurface_threshold": 1.0,
                                    "density_blob_scale": 6.0, "density_blob_std": 0.4, "backend": "torch",
                                    "pos_encoding_config": {"n_levels": 4, "log2_hashmap_size": 10}})
    colours = lambda p: {"features": torch.where(p[:, :1] > 0, torch.tensor([0.9, 0.1, 0.1]),  # noqa: E731
                                                 torch.tensor([0.1, 0.1, 0.9]))}
    nerf.export_attributes = colours
    geo = find("mesh").create_from(nerf, {"radius": 0.8, "texture": texture, "texture_size": 64,
                                          "feature_fit_steps": 150})
    v = geo.isosurface().v_pos
    # The blob's density crosses 1 where 6 (1 - r / 0.4) = 1: r = 1/3.
    r = v.norm(dim=-1)
    assert abs(float(r.mean()) - 1 / 3) < 0.03 and float((r - 1 / 3).abs().max()) < 0.06
    with torch.no_grad():
        feats = geo.export_attributes(v)["features"]
    _check_sides(feats, v)


def _quad_geometry(size=16):
    """A unit square in the plane x = 0, facing +x, with u along +y and v along +z."""
    geo = find("mesh")({"texture": "uv", "texture_size": size})
    v = torch.tensor([[0.0, -0.5, -0.5], [0.0, 0.5, -0.5], [0.0, 0.5, 0.5], [0.0, -0.5, 0.5]])
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    geo.set_mesh(Mesh(v, f, v[:, 1:] + 0.5, f.clone()))
    return geo


def _render(geo, size=40):
    from lift3d.materials.base import BaseMaterial

    class Plain(BaseMaterial):
        def forward(self, features, **kw):
            return features[..., :3]

    r = find("mesh-rasterizer")({}, geometry=geo, material=Plain({}), background=None)
    cams = make_cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([40.0]),
                        size, size)
    return r(**cams), cams


def test_uv_texture_is_sampled_where_the_uvs_say():
    geo = _quad_geometry(16)
    with torch.no_grad():
        geo.texture.zero_()
        # Image layout: rows 0..7 are the top half (v > 0.5, so z > 0), columns 0..7 the left (u < 0.5, y < 0).
        geo.texture[:8, :8] = 1.0
    out, cams = _render(geo)
    # Where each pixel's ray meets the plane x = 0.
    o, d = cams["rays_o"][0], cams["rays_d"][0]
    hit = o + d * (-o[..., :1] / d[..., :1])
    y, z = hit[..., 1], hit[..., 2]
    inner = (y.abs() < 0.45) & (z.abs() < 0.45)
    margin = 1.5 / 16  # bilinear filtering blurs one texel across the painted border
    painted = inner & (y < -margin) & (z > margin)
    blank = inner & ((y > margin) | (z < -margin))
    rgb = out["comp_rgb"][0]
    assert painted.sum() > 20 and blank.sum() > 60
    assert rgb[painted].min().item() > 0.99
    assert rgb[blank].max().item() < 0.01
    # Gradients reach the texture, and only texels that were seen.
    rgb.sum().backward()
    g = geo.texture.grad.abs().sum(-1)
    assert float(g[:8, :8].sum()) > 0 and float(g.sum()) > 0


def test_checkpoint_rebuilds_mesh_and_texture_without_a_source():
    geo = find("mesh").create_from(_gaussian_ball(), {"radius": 0.8, "texture": "uv", "texture_size": 32})
    with torch.no_grad():
        geo.texture.add_(0.1 * torch.randn_like(geo.texture))
    state = geo.state_dict()
    fresh = find("mesh")({"radius": 0.8, "texture": "uv", "texture_size": 32})
    with pytest.raises(ValueError, match="mesh_path"):
        fresh.isosurface()
    fresh.load_state_dict(state)  # strict: every key is there, shapes adopted from the checkpoint
    a, b = geo.isosurface(), fresh.isosurface()
    assert torch.equal(a.v_pos, b.v_pos) and torch.equal(a.t_pos_idx, b.t_pos_idx)
    assert torch.equal(a.v_tex, b.v_tex) and torch.equal(a.t_tex_idx, b.t_tex_idx)
    assert torch.equal(geo.texture, fresh.texture)
    with torch.no_grad():
        torch.testing.assert_close(_render(fresh, 24)[0]["comp_rgb"], _render(geo, 24)[0]["comp_rgb"])


def test_field_mesh_from_file_still_loads_old_checkpoints(tmp_path):
    path = _box(tmp_path, "b.obj", (1.0, 1.0, 1.0))
    geo = find("mesh")({"mesh_path": str(path)})
    old = {k: v for k, v in geo.state_dict().items() if k.startswith("feature_field.")}
    find("mesh")({"mesh_path": str(path)}).load_state_dict(old)  # strict, no mesh keys: the file's mesh stands


def test_exporter_writes_the_uv_texture_as_is(tmp_path):
    from PIL import Image

    from lift3d.exporters.mesh_exporter import MeshExporter
    from lift3d.materials.base import BaseMaterial
    from lift3d.utils.io import to_uint8

    geo = _quad_geometry(16)
    with torch.no_grad():
        geo.texture.copy_(torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0)))
    # texture_size differs on purpose: the geometry's own texture is written, not a re-bake.
    out = MeshExporter({"fmt": ["obj"], "texture_size": 64}).export(geo, BaseMaterial({}), tmp_path)
    png = np.asarray(Image.open(out["texture_kd"]).convert("RGB"))
    assert png.shape == (16, 16, 3)
    assert np.array_equal(png, to_uint8(geo.texture.detach()))
    # The OBJ carries the geometry's own UVs (4 of them), not a fresh unwrap.
    vts = [line for line in out["obj"].read_text().splitlines() if line.startswith("vt ")]
    got = np.array([[float(x) for x in line.split()[1:]] for line in vts])
    assert np.allclose(np.unique(got, axis=0), np.unique(geo.v_tex.numpy(), axis=0), atol=1e-6)
