"""DMTet (tetrahedra-sdf-grid): tet grid, marching tets, initialisation, stage switch, fitting."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import trimesh

from lift3d.geometry.base import BaseImplicitGeometry, IsosurfaceError
from lift3d.geometry.tetrahedra_sdf_grid import mesh_inside_grid
from lift3d.geometry.tets import marching_tets, tet_grid
from lift3d.materials.base import BaseMaterial
from lift3d.registry import find
from lift3d.utils.cameras import make_cameras
from lift3d.utils.rasterize_ops import rasterize



def _dmtet(**cfg):
    base = {"isosurface_resolution": 24}
    base.update(cfg)
    return find("tetrahedra-sdf-grid", "geometry")(base)


def _trimesh(mesh):
    return trimesh.Trimesh(mesh.v_pos.detach().double().numpy(), mesh.t_pos_idx.numpy(), process=False)


def _voxel_iou(mesh, inside_fn, n=40, r=1.0):
    axis = torch.linspace(-r, r, n, dtype=torch.float64)
    occ = mesh_inside_grid(mesh.v_pos.detach(), mesh.t_pos_idx, axis)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    ref = inside_fn(pts)
    return ((occ & ref).sum() / (occ | ref).sum()).item()


def test_tet_grid_is_conforming_and_positively_oriented():
    v, t = tet_grid(4)
    assert v.shape == (125, 3) and t.shape == (6 * 64, 4)
    p = v[t]
    vol = torch.det(p[:, 1:] - p[:, :1]) / 6
    assert torch.all(vol > 0)
    assert vol.sum().item() == pytest.approx(8.0)  # fills [-1, 1]^3 without overlap
    # Conforming: every interior triangle is shared by exactly two tetrahedra.
    faces = torch.cat([t[:, [0, 1, 2]], t[:, [0, 1, 3]], t[:, [0, 2, 3]], t[:, [1, 2, 3]]]).sort(-1).values
    _, counts = torch.unique(faces, dim=0, return_counts=True)
    assert counts.max() == 2
    n_boundary = (counts == 1).sum().item()
    assert n_boundary == 6 * 16 * 2  # two triangles per boundary square
    assert tet_grid(4)[1] is not None and _tet_cached_same()


def _tet_cached_same():
    from lift3d.geometry.tets import _tet_grid_cpu

    return _tet_grid_cpu(4)[1] is _tet_grid_cpu(4)[1]


def test_sphere_init_vertices_on_radius_and_mesh_closed_outward():
    geo = _dmtet(shape_init="sphere:0.6")
    mesh = geo.isosurface()
    r = mesh.v_pos.norm(dim=-1)
    assert (r - 0.6).abs().max().item() < 0.01
    tm = _trimesh(mesh)
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume == pytest.approx(4 / 3 * torch.pi * 0.6**3, rel=0.03)  # > 0: outward
    fn = mesh.face_normals()
    centres = mesh.v_pos[mesh.t_pos_idx].mean(1)
    assert ((fn * centres).sum(-1) > 0).float().mean() > 0.99


def test_marching_tets_differentiable_wrt_sdf_and_positions():
    v, t = tet_grid(6)
    v = v.double().requires_grad_(True)
    sdf = (v.detach().norm(dim=-1) - 0.5).requires_grad_(True)
    verts, faces = marching_tets(v, sdf, t)
    assert faces.shape[0] > 0
    # Raising the sdf everywhere shrinks the surface: every vertex moves towards the centre.
    (g,) = torch.autograd.grad(verts.norm(dim=-1).sum(), sdf)
    assert g.sum() < 0
    (gv,) = torch.autograd.grad(marching_tets(v, sdf, t)[0].sum(), v)
    assert gv.abs().sum() > 0
    # Empty level set: no faces, and the geometry says why.
    geo = _dmtet(shape_init="sphere:0.5")
    with torch.no_grad():
        geo.sdf.fill_(1.0)
    with pytest.raises(IsosurfaceError, match="outside"):
        geo.isosurface()


def test_deformation_is_bounded_by_half_a_cell():
    geo = _dmtet()
    with torch.no_grad():
        geo.deformation.fill_(100.0)
    moved = (geo.vertex_positions() - geo.grid_vertices).abs().max().item()
    assert moved == pytest.approx(0.5 * geo.cell_size, rel=1e-4)
    assert geo.cell_size == pytest.approx(2.0 / 24)


class _AnalyticSDF(BaseImplicitGeometry):
    """Sphere SDF at an offset centre, features = position (to test feature distillation)."""

    @dataclass
    class Config(BaseImplicitGeometry.Config):
        center: tuple[float, float, float] = (0.1, -0.1, 0.05)
        """Sphere centre."""
        sphere_radius: float = 0.5
        """Sphere radius."""
        level_scale: float = 1.0
        """Multiplies the level (a density-like field has arbitrary scale)."""

    def configure(self, **kwargs):
        super().configure(**kwargs)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward_field(self, points):
        c = torch.tensor(self.cfg.center, dtype=points.dtype)
        return ((points - c).norm(dim=-1, keepdim=True) - self.cfg.sphere_radius) * self.cfg.level_scale

    def forward_level(self, field):
        return field

    def export_attributes(self, points):
        return {"features": torch.sin(3 * points)}


@pytest.mark.parametrize("level_scale", [1.0, 40.0])
def test_create_from_implicit_reproduces_surface_and_features(level_scale):
    src = _AnalyticSDF({"level_scale": level_scale})
    geo = find("tetrahedra-sdf-grid").create_from(
        src, {"isosurface_resolution": 24, "n_feature_dims": 3, "feature_fit_steps": 150})
    mesh = geo.isosurface()
    c = torch.tensor([0.1, -0.1, 0.05])
    dist = ((mesh.v_pos - c).norm(dim=-1) - 0.5).abs()
    assert dist.mean().item() < 0.005 and dist.max().item() < 0.02
    iou = _voxel_iou(mesh, lambda p: (p - c.double()).norm(dim=-1) < 0.5)
    assert iou > 0.95
    assert _trimesh(mesh).is_watertight
    # The level was rescaled to SDF-like slope: the stored sdf at a grid vertex ~ its distance.
    i = geo.grid_vertices.norm(dim=-1).argmin()
    assert geo.sdf[i].item() == pytest.approx(-(0.5 - c.norm().item()), abs=0.06)
    # Features were distilled from the source.
    pts = mesh.v_pos.detach()
    err = (geo.export_attributes(pts)["features"] - torch.sin(3 * pts)).abs().mean().item()
    assert err < 0.1, err


def test_create_from_mesh_geometry_and_mesh_shape_init(tmp_path):
    box = trimesh.creation.box((1.0, 0.6, 0.8))
    path = tmp_path / "box.obj"
    box.export(str(path))
    mesh_geo = find("mesh")({"mesh_path": str(path), "normalize": False})
    geo = find("tetrahedra-sdf-grid").create_from(mesh_geo, {"isosurface_resolution": 24, "feature_fit_steps": 20})
    tm = _trimesh(geo.isosurface())
    assert tm.is_watertight
    assert tm.volume == pytest.approx(0.48, rel=0.06)
    iou = _voxel_iou(geo.isosurface(), lambda p: (p.abs() < torch.tensor([0.5, 0.3, 0.4], dtype=p.dtype)).all(-1))
    assert iou > 0.9  # sub-cell accurate: faces at +-0.3 and +-0.4 fall between lattice points
    # shape_init from the same file, normalised into 0.9 radius: largest half-extent 0.9.
    geo2 = _dmtet(shape_init=f"mesh:{path}")
    ext = geo2.isosurface().v_pos.amax(0) - geo2.isosurface().v_pos.amin(0)
    assert ext[0].item() == pytest.approx(1.8, abs=0.1)
    assert ext[1].item() == pytest.approx(1.8 * 0.6, abs=0.1)


def test_shape_init_ellipsoid_and_errors():
    geo = _dmtet(shape_init="ellipsoid:0.7,0.4,0.3")
    ext = geo.isosurface().v_pos.amax(0)
    assert torch.allclose(ext, torch.tensor([0.7, 0.4, 0.3]), atol=0.02)
    with pytest.raises(ValueError, match="shape_init"):
        _dmtet(shape_init="torus:1")
    with pytest.raises(ValueError, match="shape_init"):
        _dmtet(shape_init="ellipsoid:1,2")


def test_fix_geometry_freezes_and_caches():
    geo = _dmtet(fix_geometry=True)
    assert not geo.sdf.requires_grad and not geo.deformation.requires_grad
    m1, m2 = geo.isosurface(), geo.isosurface()
    assert m1 is m2 and not m1.v_pos.requires_grad
    trainable = [n for n, p in geo.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("feature_field") for n in trainable)
    live = _dmtet()
    assert live.isosurface().v_pos.requires_grad


class _Sigmoid(BaseMaterial):
    def forward(self, features, **kwargs):
        return torch.sigmoid(features)


def test_dmtet_fits_multiview_silhouettes():
    """DMTet (res 16) + mesh-rasterizer, 4 views at 32 px: ellipsoid silhouettes, IoU > 0.9 in 40 steps."""
    torch.manual_seed(0)
    el = torch.tensor([0.0, 0.0, 50.0, -50.0])
    az = torch.tensor([0.0, 90.0, 45.0, 225.0])
    cams = make_cameras(el, az, torch.full((4,), 2.5), torch.full((4,), 40.0), 32, 32)
    tm = trimesh.creation.icosphere(3)
    tv = torch.tensor(tm.vertices, dtype=torch.float32) * torch.tensor([0.75, 0.5, 0.35])
    clip = torch.einsum("bij,vj->bvi", cams["mvp_mtx"], torch.cat([tv, torch.ones_like(tv[:, :1])], -1))
    target = (rasterize(clip, torch.tensor(tm.faces), (32, 32))[..., 3:] > 0).float()
    geo = _dmtet(isosurface_resolution=16, shape_init="sphere:0.45")
    renderer = find("mesh-rasterizer")({}, geometry=geo, material=_Sigmoid({}), background=None)

    def iou(m):
        a, b = m > 0.5, target > 0.5
        return ((a & b).sum() / (a | b).sum()).item()

    opt = torch.optim.Adam([geo.sdf, geo.deformation], lr=0.02)
    with torch.no_grad():
        iou0 = iou(renderer(**cams)["opacity"])
    for _ in range(40):
        out = renderer(**cams)
        loss = (out["opacity"] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = renderer(**cams)
    iou1 = iou(out["opacity"])
    assert iou0 < 0.7
    assert iou1 > 0.9, f"IoU {iou0:.3f} -> {iou1:.3f}"
    assert _trimesh(out["mesh"]).is_watertight


def test_feature_field_can_use_shared_encoding_and_follows_the_step():
    enc = {"otype": "ProgressiveBandHashGrid", "n_levels": 6, "n_features_per_level": 2, "log2_hashmap_size": 12,
           "base_resolution": 4, "per_level_scale": 1.5, "start_level": 2, "start_step": 0, "update_steps": 10}
    geo = _dmtet(isosurface_resolution=8, n_feature_dims=4, pos_encoding_config=enc)
    pts = torch.rand(256, 3) * 2 - 1
    target = torch.sin(4 * pts).sum(-1, keepdim=True).expand(-1, 4)
    geo.update_step(0, 1000)  # all levels on
    assert geo.feature_field.encoding.current_level == 6
    opt = torch.optim.Adam(geo.feature_field.parameters(), lr=1e-2)
    loss0 = (geo.export_attributes(pts)["features"] - target).square().mean().item()
    for _ in range(80):
        loss = (geo.export_attributes(pts)["features"] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * loss0


def test_feature_field_backend_switch():
    from lift3d.backends import tcnn_backend
    from lift3d.geometry.encodings import HashGridEncoding

    enc = {"otype": "HashGrid", "n_levels": 2, "log2_hashmap_size": 8, "base_resolution": 4}
    geo = _dmtet(isosurface_resolution=4, pos_encoding_config=enc, backend="torch")
    assert isinstance(geo.feature_field.encoding, HashGridEncoding)
    if not tcnn_backend.available():
        with pytest.raises(RuntimeError, match="backend 'tcnn' was asked for"):
            _dmtet(isosurface_resolution=4, pos_encoding_config=enc, backend="tcnn")


def test_surface_cube_culling_matches_full_marching_tets():
    geo = _dmtet(isosurface_resolution=12, shape_init="ellipsoid:0.7,0.5,0.3")
    torch.manual_seed(0)
    with torch.no_grad():
        geo.deformation.normal_()
        geo.sdf.add_(0.05 * torch.randn_like(geo.sdf))  # a few islands and holes
    fast = geo.isosurface()
    v_full, f_full = marching_tets(geo.vertex_positions(), geo.sdf, geo.tets)
    assert fast.n_faces == f_full.shape[0]
    a = fast.v_pos.detach()[fast.t_pos_idx].mean(1).sort(0).values
    b = v_full.detach()[f_full].mean(1).sort(0).values
    assert torch.allclose(a, b)


class _DensityBall(_AnalyticSDF):
    """A NeRF-like level: threshold - density, with density saturating inside and ~0 in empty space."""

    def forward_field(self, points):
        c = torch.tensor(self.cfg.center, dtype=points.dtype)
        d = (points - c).norm(dim=-1, keepdim=True) - self.cfg.sphere_radius
        return 50.0 * torch.sigmoid(-d / 0.01)  # density

    def forward_level(self, field):
        return 25.0 - field


def test_create_from_density_field_gives_distances_far_from_the_surface():
    geo = find("tetrahedra-sdf-grid").create_from(_DensityBall(), {"isosurface_resolution": 24, "feature_fit_steps": 0})
    c = torch.tensor([0.1, -0.1, 0.05])
    true = (geo.grid_vertices - c).norm(dim=-1) - 0.5
    far = true.abs() > 3 * geo.cell_size
    # Empty space must not hold near-zero values that the first updates would flip into floaters.
    assert (geo.sdf[far].sign() == true[far].sign()).all()
    assert (geo.sdf[far].abs() > 0.5 * true[far].abs()).all()
    dist = ((geo.isosurface().v_pos - c).norm(dim=-1) - 0.5).abs()
    assert dist.mean().item() < 0.01
