"""3D Gaussians geometry: initialisation, densify/prune with a live optimizer, checkpoints, mesh, fitting."""

from __future__ import annotations

import math

import pytest
import torch

from lift3d.config import ConfigError
from lift3d.geometry.gaussian_strategy import DefaultStrategy, PARAM_NAMES
from lift3d.geometry.gaussians import GaussianModel
from lift3d.registry import _REGISTRY, category_of
from lift3d.renderers.splatting import GaussianSplattingRenderer
from lift3d.utils.cameras import make_cameras
from lift3d.utils.gaussian_math import eval_sh, rgb_to_sh, sh_to_rgb
from lift3d.utils.mesh import Mesh



def _adam(geo, lr=0.01):
    return torch.optim.Adam([{"params": [getattr(geo, n)], "name": f"geometry.{n}", "lr": lr} for n in PARAM_NAMES])


def _check_optimizer_consistent(geo, opt):
    for n in PARAM_NAMES:
        p = getattr(geo, n)
        groups = [g for g in opt.param_groups if any(q is p for q in g["params"])]
        assert len(groups) == 1 and groups[0]["name"] == f"geometry.{n}", n
        st = opt.state.get(p)
        if st:
            assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape, n


def _cube_mesh(h=0.4):
    v = torch.tensor([[x, y, z] for x in (-h, h) for y in (-h, h) for z in (-h, h)], dtype=torch.float32)
    f = torch.tensor([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    return Mesh(v, f)


def test_registered_and_parameter_shapes():
    # The registry table itself: find() would import every other built-in module too, which is not under test here.
    assert _REGISTRY["gaussian-splatting"] is GaussianModel and category_of(GaussianModel) == "geometry"
    assert _REGISTRY["gaussian-splatting-renderer"] is GaussianSplattingRenderer
    geo = GaussianModel({"init": "ball:0.5", "n_init": 300, "sh_degree": 2, "seed": 0})
    assert geo.xyz.shape == (300, 3) and geo.features_dc.shape == (300, 3)
    assert geo.features_rest.shape == (300, 8, 3) and geo.scaling.shape == (300, 3)
    assert geo.rotation.shape == (300, 4) and geo.opacity.shape == (300, 1)
    assert geo.xyz.norm(dim=-1).max() <= 0.5 + 1e-6
    assert geo.get_opacity.mean().item() == pytest.approx(0.1, abs=1e-5)
    names = {n for n, _ in geo.named_parameters()}
    assert names == set(PARAM_NAMES)


def test_init_sphere_points_mesh_and_errors():
    geo = GaussianModel({"init": "sphere:0.7", "n_init": 200, "seed": 1})
    torch.testing.assert_close(geo.xyz.norm(dim=-1), torch.full((200,), 0.7), atol=1e-5, rtol=0)
    pts = torch.tensor([[0.0, 0, 0], [0.1, 0, 0], [0, 0.2, 0], [0, 0, 0.3]])
    cols = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]])
    geo = GaussianModel({"init": "points"}, init_points=pts, init_colors=cols)
    torch.testing.assert_close(geo.xyz.detach(), pts)
    torch.testing.assert_close(geo.base_colors().detach(), cols, atol=1e-5, rtol=0)
    geo = GaussianModel({"init": "mesh", "n_init": 500, "seed": 0}, init_mesh=_cube_mesh(0.4))
    # Every sample lies on the cube's surface: its largest |coordinate| is the half-size.
    torch.testing.assert_close(geo.xyz.abs().max(dim=-1).values, torch.full((500,), 0.4), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="init"):
        GaussianModel({"init": "cone:1"})
    with pytest.raises(ConfigError, match="init_points"):
        GaussianModel({"init": "points"})


def test_sh_helpers_round_trip():
    rgb = torch.rand(10, 3)
    torch.testing.assert_close(sh_to_rgb(rgb_to_sh(rgb)), rgb)
    sh = torch.randn(10, 16, 3)
    d = torch.nn.functional.normalize(torch.randn(10, 3), dim=-1)
    # Degree 0 ignores direction; higher degrees add terms that vanish with zero coefficients.
    torch.testing.assert_close(eval_sh(0, sh, d), 0.28209479177387814 * sh[:, 0])
    sh0 = sh.clone()
    sh0[:, 1:] = 0
    torch.testing.assert_close(eval_sh(3, sh0, d), eval_sh(0, sh0, d))


def _strategy_geo(n=40, **cfg):
    base = {"init": "ball:0.5", "n_init": n, "seed": 0, "init_scale": 0.005, "init_opacity": 0.5,
            "densify_grad_threshold": 0.1, "percent_dense": 0.01, "densify_extent": 1.0,
            "prune_opacity_threshold": 0.05, "opacity_reset_interval": 0, "max_screen_size": 0.0}
    base.update(cfg)
    return GaussianModel(base)


def test_densify_clone_split_prune_counts_and_adam_state():
    torch.manual_seed(0)
    geo = _strategy_geo()
    opt = _adam(geo)
    # One Adam step so every parameter has state to carry over.
    (geo.xyz.sum() + geo.features_dc.sum() + geo.scaling.sum() + geo.rotation.sum() + geo.opacity.sum()).backward()
    opt.step()
    opt.zero_grad()
    st: DefaultStrategy = geo.strategy
    with torch.no_grad():
        geo.scaling[20:30] = math.log(0.05)  # large: above percent_dense * extent = 0.01 -> split
        geo.opacity[35:] = -10.0  # nearly transparent -> pruned
    st.grad_accum[:] = 0.0
    st.denom[:] = 1.0
    st.grad_accum[10:15] = 1.0  # 5 small Gaussians with big gradients -> cloned
    st.grad_accum[20:24] = 1.0  # 4 large ones -> split in 2 each, parents removed
    kept_xyz = geo.xyz[0].detach().clone()
    kept_m = opt.state[geo.xyz]["exp_avg"][0].clone()
    st.densify_and_prune(geo, opt, step=200)
    assert geo.num_points == 40 + 5 + 4 - 5
    _check_optimizer_consistent(geo, opt)
    torch.testing.assert_close(geo.xyz[0].detach(), kept_xyz)
    torch.testing.assert_close(opt.state[geo.xyz]["exp_avg"][0], kept_m)  # survivors keep their moments
    assert torch.all(opt.state[geo.xyz]["exp_avg"][-8:] == 0)  # new ones start fresh
    # Split children are smaller than their parents by 1 / (0.8 * 2).
    torch.testing.assert_close(geo.get_scaling[-8:], torch.full((8, 3), 0.05 / 1.6), rtol=1e-5, atol=0)
    assert geo.get_opacity.min() > 0.05
    # The optimizer still works on the new parameters.
    loss = (geo.xyz**2).sum() + geo.opacity.sum()
    loss.backward()
    before = geo.xyz.detach().clone()
    opt.step()
    assert (geo.xyz.detach() - before).abs().max() > 0
    assert st.grad_accum.shape == (geo.num_points,)


def test_max_num_caps_densification_and_opacity_reset():
    geo = _strategy_geo(max_num=43, prune_opacity_threshold=0.0)
    opt = _adam(geo)
    st = geo.strategy
    st.denom[:] = 1.0
    st.grad_accum[:10] = torch.linspace(1.0, 2.0, 10)  # ten small candidates, room for three
    st.densify(geo, opt)
    assert geo.num_points == 43
    _check_optimizer_consistent(geo, opt)
    # The three with the largest gradients (indices 7, 8, 9) were cloned.
    torch.testing.assert_close(geo.xyz[-3:].detach(), geo.xyz[7:10].detach())
    st.reset_opacity(geo, opt)
    assert geo.get_opacity.max().item() == pytest.approx(0.01, rel=1e-4)
    _check_optimizer_consistent(geo, opt)


def test_prune_too_large_on_screen_or_in_world():
    geo = _strategy_geo(n=30, max_screen_size=20.0, prune_world_size=0.1, prune_opacity_threshold=0.0)
    opt = _adam(geo)
    st = geo.strategy
    st.max_radii[:5] = 25.0  # too large on screen
    with torch.no_grad():
        geo.scaling[5:8] = math.log(0.2)  # larger than 0.1 * extent in the world
    keep_xyz = geo.xyz[8:].detach().clone()
    st.prune(geo, opt, screen_and_world=False)
    assert geo.num_points == 30  # before the first opacity reset only opacity prunes
    st.prune(geo, opt, screen_and_world=True)
    assert geo.num_points == 22
    torch.testing.assert_close(geo.xyz.detach(), keep_xyz)
    _check_optimizer_consistent(geo, opt)


def test_hooks_driven_by_renderer_output():
    geo = _strategy_geo(n=60, densify_grad_threshold=1e-9, densify_from_iter=0, densification_interval=1,
                        prune_opacity_threshold=0.0, init_scale=0.05)
    rend = GaussianSplattingRenderer({}, geometry=geo)
    opt = _adam(geo)
    cam = make_cameras(torch.tensor([10.0, 20.0]), torch.tensor([0.0, 120.0]), torch.tensor([2.0, 2.0]),
                       torch.tensor([40.0, 40.0]), 24, 24)
    out = rend(**cam)
    out["comp_rgb"].mean().backward()
    geo.post_backward(out)
    seen = out["visibility_filter"].any(0)
    assert torch.all(geo.strategy.denom[seen] > 0) and torch.all(geo.strategy.grad_accum[seen] > 0)
    opt.step()
    geo.update_step(0, 5)
    n_before = geo.num_points
    geo.post_optimizer_step(opt)
    assert geo.num_points > n_before  # every seen Gaussian passed the tiny threshold
    _check_optimizer_consistent(geo, opt)
    out = rend(**cam)  # renders and trains with the new set
    out["comp_rgb"].mean().backward()
    opt.step()


def test_load_checkpoint_with_a_different_count():
    a = GaussianModel({"init": "ball:0.5", "n_init": 123, "seed": 0, "sh_degree": 1})
    b = GaussianModel({"init": "ball:0.5", "n_init": 10, "seed": 1, "sh_degree": 1})
    b.load_state_dict(a.state_dict())
    assert b.num_points == 123
    for n in PARAM_NAMES:
        torch.testing.assert_close(getattr(b, n), getattr(a, n))
    assert b.strategy.grad_accum.shape == (123,)


def test_isosurface_of_gaussians_on_a_sphere():
    n = 3000
    g = torch.Generator().manual_seed(0)
    pts = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * 0.5
    cfg = {"init": "points", "init_scale": 0.03, "init_opacity": 0.9, "isosurface_resolution": 48, "radius": 0.8}
    mesh = GaussianModel({**cfg, "isosurface_fill": False}, init_points=pts).isosurface()
    r = mesh.v_pos.norm(dim=-1)
    # Unfilled, a thin shell around r = 0.5: both of its faces lie within a few Gaussian sigmas.
    assert mesh.n_faces > 500
    assert (r - 0.5).abs().max() < 0.1
    assert abs(r.mean().item() - 0.5) < 0.03
    assert r.min() < 0.47
    # Filled (the default), only the outer face is left.
    r = GaussianModel(cfg, init_points=pts).isosurface().v_pos.norm(dim=-1)
    assert r.min() > 0.5 and r.max() < 0.6
    geo_auto = GaussianModel({**cfg, "isosurface_resolution": 32, "density_thresh": "auto"}, init_points=pts)
    assert ((geo_auto.isosurface().v_pos.norm(dim=-1) - 0.5).abs().max() < 0.12)


def _enclosed_volume(mesh) -> float:
    tri = mesh.v_pos[mesh.t_pos_idx]
    return float((tri[:, 0] * torch.cross(tri[:, 1], tri[:, 2], dim=-1)).sum() / 6.0)


@pytest.mark.parametrize("fill", [False, True])
def test_isosurface_of_a_faint_shell_is_the_solid_it_renders(fill):
    # What SDS leaves: many faint Gaussians on a sphere (each below the level, together opaque to
    # every view) and a few opaque ones. The level set alone is a scatter of small blobs; filled,
    # the mesh encloses the ball the shell renders as.
    g = torch.Generator().manual_seed(0)
    pts = torch.nn.functional.normalize(torch.randn(12300, 3, generator=g), dim=-1) * 0.5
    geo = GaussianModel({"init": "points", "init_scale": 0.012, "init_opacity": 0.3, "isosurface_resolution": 64,
                         "radius": 0.8, "density_thresh": 0.5, "isosurface_fill": fill}, init_points=pts)
    with torch.no_grad():
        geo.opacity[12000:] = 3.0  # opacity 0.95
    mesh = geo.isosurface()
    ball = 4.0 / 3.0 * math.pi * 0.5**3
    if fill:
        assert _enclosed_volume(mesh) > 0.85 * ball
        assert mesh.v_pos.norm(dim=-1).max() < 0.55
    else:
        assert _enclosed_volume(mesh) < 0.25 * ball


def test_export_attributes_colour_near_surface():
    pts = torch.tensor([[0.4, 0.0, 0.0], [-0.4, 0.0, 0.0]]).repeat_interleave(50, 0) + 0.02 * torch.randn(100, 3)
    cols = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).repeat_interleave(50, 0)
    geo = GaussianModel({"init": "points", "init_scale": 0.05, "init_opacity": 0.8}, init_points=pts, init_colors=cols)
    q = torch.tensor([[0.42, 0.0, 0.01], [-0.41, 0.01, 0.0], [0.0, 0.0, 0.9]])
    f = geo.export_attributes(q)["features"]
    assert f.shape == (3, 3)
    torch.testing.assert_close(f[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(f[1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-3, rtol=0)
    assert f[2].sum() > 0.99  # far from all Gaussians: nearest one's colour, not black


def _psnr(a, b):
    return (-10 * torch.log10(((a - b) ** 2).mean())).item()


def test_fit_multiview_renders_of_a_known_gaussian_scene():
    """Random init fits 8 views (32x32) of a 24-Gaussian ground truth to > 30 dB PSNR in 150 Adam steps (~44 dB seen)."""
    torch.manual_seed(0)
    H = W = 32
    az = torch.arange(8) * 45.0
    cams = make_cameras(torch.where(torch.arange(8) % 2 == 0, 20.0, -10.0), az, torch.full((8,), 2.2),
                        torch.full((8,), 45.0), H, W)
    gt_pts = torch.nn.functional.normalize(torch.randn(24, 3), dim=-1) * 0.35
    gt_col = (gt_pts / 0.7 + 0.5).clamp(0, 1)  # colour by position: views differ
    gt = GaussianModel({"init": "points", "init_scale": 0.12, "init_opacity": 0.9, "strategy": "none"},
                       init_points=gt_pts, init_colors=gt_col)
    white = torch.ones(3)
    with torch.no_grad():
        target = GaussianSplattingRenderer({}, geometry=gt)(**cams, bg_color=white)["comp_rgb"]
    geo = GaussianModel({"init": "ball:0.5", "n_init": 150, "seed": 0, "init_scale": 0.08, "strategy": "none"})
    rend = GaussianSplattingRenderer({}, geometry=geo)
    lrs = {"xyz": 0.01, "features_dc": 0.05, "features_rest": 0.01, "scaling": 0.02, "rotation": 0.02, "opacity": 0.1}
    opt = torch.optim.Adam([{"params": [getattr(geo, n)], "name": f"geometry.{n}", "lr": lr} for n, lr in lrs.items()])
    views = {k: v for k, v in cams.items()}
    with torch.no_grad():
        start = _psnr(rend(**views, bg_color=white)["comp_rgb"], target)
    for step in range(150):
        idx = torch.randperm(8)[:4]
        batch = {k: (v[idx] if torch.is_tensor(v) else v) for k, v in cams.items()}
        out = rend(**batch, bg_color=white)
        loss = ((out["comp_rgb"] - target[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = _psnr(rend(**views, bg_color=white)["comp_rgb"], target)
    assert end > 30.0, (start, end)
    assert end > start + 8


def test_create_from_a_surface_geometry_samples_its_mesh():
    from lift3d.geometry.base import BaseGeometry

    class Cube(BaseGeometry):
        def isosurface(self):
            return _cube_mesh(0.3)

        def export_attributes(self, points):
            return {"features": torch.tensor([0.0, 1.0, 0.0]).expand(points.shape[0], 3)}

    geo = GaussianModel.create_from(Cube(), {"n_init": 300, "seed": 0})
    assert isinstance(geo, GaussianModel) and geo.num_points == 300
    torch.testing.assert_close(geo.xyz.abs().max(dim=-1).values, torch.full((300,), 0.3), atol=1e-5, rtol=0)
    torch.testing.assert_close(geo.base_colors().detach(), torch.tensor([0.0, 1.0, 0.0]).expand(300, 3), atol=1e-5, rtol=0)
    copy = GaussianModel.create_from(geo, {"n_init": 5})
    assert copy.num_points == 300
