"""mesh-rasterizer: coverage, depth, normals, compositing, background rays, gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import trimesh

from lift3d.backgrounds.base import BaseBackground
from lift3d.geometry.base import BaseGeometry
from lift3d.materials.base import BaseMaterial
from lift3d.registry import find
from lift3d.renderers.rasterizer import _rays_from_mvp
from lift3d.utils.cameras import make_cameras
from lift3d.utils.mesh import Mesh



class _SphereGeometry(BaseGeometry):
    """An icosphere with learnable vertex offsets; features = position (so colour varies)."""

    @dataclass
    class Config(BaseGeometry.Config):
        sphere_radius: float = 0.5
        """Radius of the icosphere."""

    def configure(self, **kwargs):
        super().configure(**kwargs)
        m = trimesh.creation.icosphere(3, radius=self.cfg.sphere_radius)
        self.register_buffer("v0", torch.tensor(m.vertices, dtype=torch.float32))
        self.register_buffer("faces", torch.tensor(m.faces))
        self.offset = torch.nn.Parameter(torch.zeros_like(self.v0))
        self.feature_scale = torch.nn.Parameter(torch.ones(3))

    def isosurface(self):
        return Mesh(self.v0 + self.offset, self.faces)

    def export_attributes(self, points):
        return {"features": points * self.feature_scale}


class _AlbedoMaterial(BaseMaterial):
    def forward(self, features, **kwargs):
        self.seen = kwargs
        return torch.sigmoid(features[..., :3])


class _ConstBackground(BaseBackground):
    def forward(self, dirs):
        self.dirs = dirs
        return (dirs + 1) / 2


def _cams(n=2, size=48, dist=2.0, fovy=40.0):
    return make_cameras(torch.linspace(-20, 30, n), torch.linspace(0, 200, n), torch.full((n,), dist),
                        torch.full((n,), fovy), size, size)


def _renderer(**cfg):
    geo = _SphereGeometry({})
    mat = _AlbedoMaterial({})
    bg = _ConstBackground({})
    return find("mesh-rasterizer", "renderer")(cfg, geometry=geo, material=mat, background=bg), geo, mat, bg


def test_outputs_shapes_coverage_depth_normals():
    r, geo, mat, bg = _renderer()
    cams = _cams()
    out = r(**cams)
    B, H, W = 2, 48, 48
    for k in ("comp_rgb", "comp_rgb_fg", "comp_rgb_bg", "comp_normal"):
        assert out[k].shape == (B, H, W, 3), k
    assert out["opacity"].shape == out["depth"].shape == (B, H, W, 1)
    assert isinstance(out["mesh"], Mesh)
    # Projected disc of a sphere of radius 0.5 seen from distance 2 (angular radius asin(r/d)).
    half = math.tan(math.radians(20))
    disc = math.tan(math.asin(0.25)) / half  # NDC radius
    frac = math.pi * disc**2 / 4
    assert out["opacity"].mean().item() == pytest.approx(frac, rel=0.04)
    assert out["opacity"].min() >= -1e-6 and out["opacity"].max() <= 1 + 1e-6
    # Centre pixel: depth = d - r, normal faces the camera.
    c = H // 2
    assert out["depth"][:, c - 1:c + 1, c - 1:c + 1].mean().item() == pytest.approx(1.5, abs=0.01)
    n = out["comp_normal"][:, c, c] * 2 - 1
    to_cam = torch.nn.functional.normalize(cams["camera_positions"], dim=-1)
    assert torch.all((n * to_cam).sum(-1) > 0.98)
    # Off the mesh: background, zero depth and zero normal.
    assert torch.allclose(out["comp_rgb"][:, 0, 0], out["comp_rgb_bg"][:, 0, 0])
    assert torch.all(out["depth"][:, 0, 0] == 0) and torch.all(out["comp_normal"][:, 0, 0] == 0)
    # Material got the documented inputs, per covered pixel.
    N = int((out["depth"] > 0).sum())
    for k in ("viewdirs", "positions", "shading_normal", "light_positions"):
        assert mat.seen[k].shape == (N, 3), k
    vd = mat.seen["viewdirs"]
    assert torch.allclose(vd.norm(dim=-1), torch.ones(N), atol=1e-5)
    # Surface colour is the material's: sigmoid of the surface point.
    inside = out["opacity"][..., 0] > 0.999
    assert torch.allclose(out["comp_rgb"][inside], out["comp_rgb_fg"][inside], atol=1e-5)


def test_background_rays_and_bg_color():
    r, geo, mat, bg = _renderer()
    cams = _cams(1, size=16)
    r(**cams)
    assert torch.equal(bg.dirs, cams["rays_d"])
    no_rays = {k: v for k, v in cams.items() if k != "rays_d"}
    out = r(**no_rays)
    assert torch.allclose(bg.dirs, cams["rays_d"], atol=1e-5)  # reconstructed from mvp_mtx
    out = r(**cams, bg_color=torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(out["comp_rgb"][0, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(_rays_from_mvp(cams["mvp_mtx"], 16, 16), cams["rays_d"], atol=1e-5)


def test_gradients_reach_vertices_and_features():
    r, geo, mat, bg = _renderer()
    out = r(**_cams(1, size=32), bg_color=torch.ones(3))
    loss = out["comp_rgb"].mean() + out["opacity"].mean() + out["depth"].mean() + out["comp_normal"].mean()
    loss.backward()
    assert geo.offset.grad.abs().sum() > 0
    assert geo.feature_scale.grad.abs().sum() > 0
    # Opacity alone moves silhouette vertices (the antialias path).
    geo.offset.grad = None
    r(**_cams(1, size=32))["opacity"].sum().backward()
    g = geo.offset.grad.norm(dim=-1)
    assert (g > 0).sum() > 10


def test_without_antialias_opacity_has_no_vertex_gradient():
    r, geo, _, _ = _renderer(antialias=False)
    out = r(**_cams(1, size=16))
    if out["opacity"].requires_grad:
        out["opacity"].sum().backward()
    assert geo.offset.grad is None or torch.all(geo.offset.grad == 0)
    r2, _, _, _ = _renderer(normal_type="face")
    out2 = r2(**_cams(1, size=16))
    assert out2["comp_normal"].shape == (1, 16, 16, 3)


def test_mesh_geometry_renders_with_real_material_if_present(tmp_path):
    m = trimesh.creation.box((1.0, 1.0, 1.0))
    path = tmp_path / "cube.obj"
    m.export(str(path))
    geo = find("mesh")({"mesh_path": str(path), "normalize": False})
    r = find("mesh-rasterizer")({}, geometry=geo, material=_AlbedoMaterial({}), background=None)
    cams = make_cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.0]), torch.tensor([40.0]), 33, 33)
    out = r(**cams)
    # Axis-aligned cube seen from +x: a square of half-size 0.5 at distance 2.5 in NDC.
    half = 0.5 / 2.5 / math.tan(math.radians(20))
    assert out["opacity"].sum().item() == pytest.approx((half * 33) ** 2, rel=0.05)
    assert out["depth"][0, 16, 16, 0].item() == pytest.approx(2.5, abs=1e-4)
    assert torch.allclose(out["comp_normal"][0, 16, 16], torch.tensor([1.0, 0.5, 0.5]), atol=1e-4)
