"""NeuS volume renderer: alpha formula, analytic sphere, pruning, gradients, fitting an SDF."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from lift3d.backgrounds.base import BaseBackground
from lift3d.geometry.base import BaseImplicitGeometry
from lift3d.materials.base import BaseMaterial
from lift3d.registry import find
from lift3d.renderers.neus import annealed_cos, neus_alpha, neus_thickness, section_sdf
from lift3d.renderers.volume import ray_box_intersect, ray_sphere_intersect
from lift3d.utils.cameras import make_cameras

# ------------------------------------------------------------------------------------------------
# Tiny stand-ins (not registered).


class SigmoidMaterial(BaseMaterial):
    """rgb = sigmoid(features[:3])."""

    def forward(self, features, **kwargs):
        return torch.sigmoid(features[..., :3])


class ConstBackground(BaseBackground):
    @dataclass
    class Config(BaseBackground.Config):
        value: float = 1.0

    def forward(self, dirs):
        return torch.full_like(dirs, self.cfg.value)


def ball_colour(points):
    """The coloured balls' albedo: a smooth gradient in (0.1, 0.9)."""
    return 0.5 + 0.4 * torch.tanh(2.0 * points)


class AnalyticSphereSDF(BaseImplicitGeometry):
    """Exact SDF of a sphere (off-centre by default) with the smooth colour gradient as features."""

    @dataclass
    class Config(BaseImplicitGeometry.Config):
        centre: list[float] = field(default_factory=lambda: [0.1, -0.05, 0.05])
        sphere_radius: float = 0.45

    def forward(self, points, output_normal=False):
        q = points - torch.tensor(self.cfg.centre, dtype=points.dtype)
        r = q.norm(dim=-1, keepdim=True)
        out = {"sdf": r - self.cfg.sphere_radius, "features": torch.logit(ball_colour(points))}
        if output_normal:
            grad = q / r.clamp(min=1e-9)
            out["normal"] = grad
            out["shading_normal"] = grad
            out["sdf_grad"] = grad
        return out

    def forward_sdf(self, points):
        return self.forward(points)["sdf"]


class DensityBall(BaseImplicitGeometry):
    """A density field, for the error path and for comparing output keys with the NeRF renderer."""

    def forward(self, points, output_normal=False):
        density = 60.0 * torch.sigmoid((0.5 - points.norm(dim=-1, keepdim=True)) / 0.01)
        out = {"density": density, "features": torch.logit(ball_colour(points))}
        if output_normal:
            out["normal"] = F.normalize(points, dim=-1)
        return out


def make_renderer(geometry, **cfg):
    base = {"num_samples_per_ray": 128, "randomized": False, "grid_prune": False}
    base.update(cfg)
    return find("neus-volume-renderer")(
        base, geometry=geometry, material=SigmoidMaterial(), background=ConstBackground({"value": 1.0})
    )


def cams(az, el=15.0, res=16, dist=2.0):
    az = torch.as_tensor(az, dtype=torch.float32).reshape(-1)
    n = az.shape[0]
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    el_t = torch.as_tensor(el, dtype=torch.float32).reshape(-1).expand(n).clone()
    return make_cameras(el_t, az, full(dist), full(40.0), res, res)


def psnr(a, b):
    return -10.0 * math.log10(float(((a - b) ** 2).mean()) + 1e-12)


# variance 0.8: s = exp(8) ~ 3000, 90% of the density within |sdf| < 0.001: a sharp surface.
SHARP_VARIANCE = 0.8


# ------------------------------------------------------------------------------------------------
# The formula.


def test_alpha_is_neus_formula_and_thickness_has_exact_gradients():
    torch.manual_seed(0)
    f_prev = torch.randn(200, dtype=torch.float64) * 0.3
    f_next = f_prev + torch.randn(200, dtype=torch.float64) * 0.05
    s = 25.0
    phi_p, phi_n = torch.sigmoid(s * f_prev), torch.sigmoid(s * f_next)
    naive = ((phi_p - phi_n) / phi_p).clamp(0.0, 1.0)
    torch.testing.assert_close(neus_alpha(f_prev, f_next, s), naive)
    # Deep inside, the plain ratio is 0/0 in float32; the log form stays exact and finite.
    deep = neus_alpha(torch.tensor([-50.0]), torch.tensor([-50.01]), torch.tensor(1000.0))
    assert torch.isfinite(deep).all() and abs(float(deep) - (1 - math.exp(-10.0))) < 1e-5
    # Float64 gradcheck through the thickness, including the inverse deviation.
    fp = f_prev[:20].clone().requires_grad_(True)
    fn = f_next[:20].clone().requires_grad_(True)
    inv_s = torch.tensor(25.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(neus_thickness, (fp, fn, inv_s))


def test_section_sdf_and_cos_annealing():
    sdf = torch.tensor([0.1, 0.1])
    slope = torch.tensor([-1.0, -1.0])
    # A sample jittered off-centre: each end is extrapolated by its own distance.
    fp, fn = section_sdf(sdf, slope, torch.tensor([0.9, 0.9]), torch.tensor([1.1, 1.1]), torch.tensor([1.0, 0.95]))
    torch.testing.assert_close(fp, torch.tensor([0.2, 0.15]))
    torch.testing.assert_close(fn, torch.tensor([0.0, -0.05]))
    cos = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    torch.testing.assert_close(annealed_cos(cos, 1.0), cos.clamp(max=0.0))
    torch.testing.assert_close(annealed_cos(cos, 0.0), (cos - 1.0) / 2.0)
    # Halfway through annealing an exiting ray still sees the surface (opacity, gradients).
    assert float(annealed_cos(torch.tensor(0.5), 0.5)) < 0.0


def test_variance_and_annealing_schedule():
    r = make_renderer(AnalyticSphereSDF(), cos_anneal_end_steps=100)
    assert abs(float(r.inv_s.detach()) - math.exp(3.0)) < 1e-3  # variance 0.3 -> s = exp(10 * 0.3)
    assert r.variance.requires_grad
    assert r.cos_anneal_ratio == 0.0
    r.update_step(0, 50)
    assert r.cos_anneal_ratio == 0.5
    r.update_step(0, 500)
    assert r.cos_anneal_ratio == 1.0
    fixed = make_renderer(AnalyticSphereSDF(), learn_variance=False)
    assert not fixed.variance.requires_grad and fixed.cos_anneal_ratio == 1.0


# ------------------------------------------------------------------------------------------------
# (1) Analytic sphere: silhouette and depth.


def test_sharp_sphere_opacity_and_depth_match_ray_sphere_hits():
    geo = AnalyticSphereSDF()
    S = 192
    r = make_renderer(geo, num_samples_per_ray=S, variance=SHARP_VARIANCE)
    r.eval()
    c = cams([0.0, 130.0], el=[10.0, -20.0], res=16)
    out = r(**c)
    assert out["comp_rgb"].shape == (2, 16, 16, 3)
    assert out["opacity"].shape == (2, 16, 16, 1) and out["depth"].shape == (2, 16, 16, 1)

    centre = torch.tensor(geo.cfg.centre)
    R = geo.cfg.sphere_radius
    o = (c["rays_o"] - centre).reshape(-1, 3)
    d = c["rays_d"].reshape(-1, 3)
    t_hit, _ = ray_sphere_intersect(o, d, R)
    # Distance of each ray from the centre; rays grazing the silhouette (within 0.03) are left out.
    miss_dist = (o - (o * d).sum(-1, keepdim=True) * d).norm(dim=-1)
    inside, outside = miss_dist < R - 0.03, miss_dist > R + 0.03
    assert inside.sum() > 100 and outside.sum() > 100
    opacity = out["opacity"].reshape(-1)
    depth = out["depth"].reshape(-1)
    assert opacity[inside].min() > 0.999
    assert opacity[outside].max() < 1e-3
    # The weight sits in the section holding the surface, so depth is within half a bin of the hit.
    t_near, t_far = ray_box_intersect(c["rays_o"].reshape(-1, 3), d, geo.cfg.radius)
    half_bin = 0.5 * (t_far - t_near) / S
    err = (depth - t_hit).abs()
    assert torch.all(err[inside] <= half_bin[inside] + 1e-3), float((err - half_bin)[inside].max())
    # Transparent pixels show the background; normals face the camera at the hit.
    torch.testing.assert_close(out["comp_rgb"].reshape(-1, 3)[outside], torch.ones(int(outside.sum()), 3))
    hit_n = F.normalize(o + d * t_hit[:, None], dim=-1)
    torch.testing.assert_close(out["comp_normal"].reshape(-1, 3)[inside], (hit_n[inside] + 1) / 2, atol=0.02, rtol=0)


def test_depth_is_unbiased_at_the_initial_soft_variance():
    """NeuS's point: even a soft shell (s ~ 20, 90% within |sdf| < 0.15) puts the expected depth on the surface,
    exactly for planes and to first order for a curved surface seen near head-on."""
    geo = AnalyticSphereSDF({"centre": [0.0, 0.0, 0.0], "sphere_radius": 0.5})
    r = make_renderer(geo, num_samples_per_ray=256)
    r.eval()
    c = cams([0.0, 90.0, 200.0], el=[0.0, 0.0, 40.0], res=16)
    out = r(**c)
    o = c["rays_o"].reshape(-1, 3)
    d = c["rays_d"].reshape(-1, 3)
    t_hit, _ = ray_sphere_intersect(o, d, 0.5)
    # Rays meeting the surface within ~24 degrees of its normal (miss distance < 0.2 of 0.5); more
    # oblique ones see the curvature across the soft shell and come out a few cm short.
    near_normal = (o - (o * d).sum(-1, keepdim=True) * d).norm(dim=-1) < 0.2
    assert near_normal.sum() >= 40
    err = (out["depth"].reshape(-1) - t_hit)[near_normal].abs()
    assert err.max() < 5e-3, float(err.max())
    # NeuS's opacity of a ray is 1 - Phi_s(deepest sdf) / Phi_s(entry sdf): here >= 1 - sigmoid(-20 * 0.3).
    assert torch.all(out["opacity"].reshape(-1)[near_normal] > 0.997)


def test_outputs_match_nerf_renderer_keys_and_pack_consistently():
    c = cams([30.0], res=8)
    nerf = find("nerf-volume-renderer")(
        {"num_samples_per_ray": 32, "grid_prune": False, "return_comp_normal": True},
        geometry=DensityBall(), material=SigmoidMaterial(), background=ConstBackground(),
    )
    nerf.eval()
    r = make_renderer(AnalyticSphereSDF(), num_samples_per_ray=32)
    r.eval()
    out = r(**c)
    nerf_keys = set(nerf(**c)) - {"density"}  # the one NeRF-only key: NeuS returns sdf/alpha instead
    assert nerf_keys <= set(out), nerf_keys - set(out)
    for k in ("comp_rgb", "comp_rgb_fg", "comp_rgb_bg", "comp_normal"):
        assert out[k].shape == (1, 8, 8, 3), k
    nv = out["weights"].shape[0]
    for k, dim in (("points", 3), ("t_points", 1), ("t_intervals", 1), ("t_dirs", 3), ("normal", 3),
                   ("sdf", 1), ("sdf_grad", 3), ("alpha", 1)):
        assert out[k].shape == (nv, dim), k
    per_ray = torch.zeros(64).index_add(0, out["ray_indices"], out["weights"][:, 0])
    torch.testing.assert_close(per_ray, out["opacity"].reshape(-1), atol=1e-5, rtol=0)


def test_eval_chunking_matches_single_pass():
    r = make_renderer(AnalyticSphereSDF(), num_samples_per_ray=48)
    r.eval()
    c = cams([45.0], res=12)
    one = r(**c)
    r.cfg.eval_chunk_size = 50
    many = r(**c)
    for k in ("comp_rgb", "opacity", "depth", "comp_normal"):
        torch.testing.assert_close(one[k], many[k])
    torch.testing.assert_close(one["ray_indices"], many["ray_indices"])


def test_density_geometry_is_rejected_with_a_clear_error():
    r = make_renderer(DensityBall(), num_samples_per_ray=8)
    with pytest.raises(TypeError, match="sdf"):
        r(**cams([0.0], res=4))


def test_occupancy_band_prunes_to_a_shell_and_keeps_the_image():
    geo = AnalyticSphereSDF()
    c = cams([30.0, 200.0], res=16)
    ref = make_renderer(geo, num_samples_per_ray=96, variance=0.5)
    ref.eval()
    pr = make_renderer(geo, num_samples_per_ray=96, variance=0.5, grid_prune=True, grid_resolution=32)
    pr.eval()
    pr.update_step(0, 0)
    # Shell |sdf| < cell diagonal (0.108) + 8 / e^5 (0.054) around a sphere of radius 0.45, dilated
    # by a cell: ~14% of the box; the solid ball alone would be ~5%, the box 100%.
    frac = pr.occupancy.occupied_fraction
    assert 0.05 < frac < 0.25
    a, b = ref(**c), pr(**c)
    assert b["weights"].shape[0] < 0.4 * a["weights"].shape[0]
    torch.testing.assert_close(a["comp_rgb"], b["comp_rgb"], atol=2e-3, rtol=0)
    torch.testing.assert_close(a["opacity"], b["opacity"], atol=2e-3, rtol=0)
    # A soft shell (small s) keeps a wider band: pruning never cuts into the logistic density.
    soft = make_renderer(geo, grid_prune=True, grid_resolution=32)
    soft.update_step(0, 0)
    assert soft.occupancy.occupied_fraction > frac


# ------------------------------------------------------------------------------------------------
# (3) Gradients.


def tiny_sdf(**over):
    cfg = {
        "radius": 1.0,
        "pos_encoding_config": {"n_levels": 8, "log2_hashmap_size": 14, "base_resolution": 8, "per_level_scale": 1.5},
        "mlp_network_config": {"n_neurons": 32, "n_hidden_layers": 1},
        "sdf_bias": "sphere",
        "sdf_bias_params": 0.5,
        "backend": "torch",
    }
    cfg.update(over)
    return find("implicit-sdf")(cfg)


@pytest.mark.parametrize("normal_type", ["finite_difference", "analytic"])
def test_gradients_reach_variance_and_sdf_network(normal_type):
    torch.manual_seed(0)
    geo = tiny_sdf(normal_type=normal_type)
    r = make_renderer(geo, num_samples_per_ray=32, randomized=True)
    r.train()
    c = cams([20.0], res=8)
    out = r(**c)
    target = torch.rand_like(out["comp_rgb"])
    eikonal = ((out["sdf_grad"].norm(dim=-1) - 1.0) ** 2).mean()
    loss = F.mse_loss(out["comp_rgb"], target)
    loss.backward(retain_graph=True)
    assert r.variance.grad is not None and torch.isfinite(r.variance.grad) and r.variance.grad.abs() > 0
    for name, p in geo.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in geo.density_network.parameters())
    assert any(p.grad.abs().sum() > 0 for p in geo.encoding.parameters())
    # The eikonal term is differentiable w.r.t. the SDF network through sdf_grad.
    geo.zero_grad()
    eikonal.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in geo.density_network.parameters())


# ------------------------------------------------------------------------------------------------
# (2) Fitting: implicit-sdf (initialised as a sphere) learns a coloured ellipsoid from 8 views.

ELLIPSOID_RADII = torch.tensor([0.55, 0.42, 0.35])
FIT_RES = 20
FIT_STEPS = 150
FIT_RAYS = 512
FIT_SAMPLES = 32
FIT_LAMBDA_EIKONAL = 0.1
# dB on 2 held-out views. The sphere we start from scores ~15 dB; 150 steps reach ~26-28 dB, about
# 90% of the remaining error sitting on silhouette pixels (the ground truth is not anti-aliased).
FIT_MIN_PSNR = 24.0


def ellipsoid_views(c):
    """Exact renders of the coloured ellipsoid over white: rgb [B,H,W,3] (scaling rays keeps t)."""
    o = c["rays_o"].reshape(-1, 3)
    d = c["rays_d"].reshape(-1, 3)
    t_near, t_far = ray_sphere_intersect(o / ELLIPSOID_RADII, d / ELLIPSOID_RADII, 1.0)
    hit = (t_far > t_near)[:, None]
    rgb = torch.where(hit, ball_colour(o + d * t_near[:, None]), torch.ones_like(o))
    return rgb.view(c["rays_o"].shape)


def ellipsoid_surface_points(n):
    u = F.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    return u / (u / ELLIPSOID_RADII).norm(dim=-1, keepdim=True)


def test_implicit_sdf_fits_multiview_renders():
    """~10 s of CPU on one core: 150 steps of 512 rays x 32 samples (band-pruned), eikonal-regularised."""
    torch.manual_seed(0)
    train_c = cams(torch.arange(8) * 45.0, el=torch.tensor([15.0, -10.0] * 4), res=FIT_RES)
    test_c = cams([22.5, 202.5], el=[30.0, 0.0], res=FIT_RES)
    gt_train, gt_test = ellipsoid_views(train_c), ellipsoid_views(test_c)

    geo = tiny_sdf()
    r = make_renderer(geo, num_samples_per_ray=FIT_SAMPLES, randomized=True, grid_prune=True, grid_resolution=24,
                      occ_update_interval=8, occ_warmup_steps=64)
    surf = ellipsoid_surface_points(2000)
    with torch.no_grad():
        sdf_err0 = float(geo.forward_sdf(surf).abs().mean())
    opt = torch.optim.Adam(
        [
            {"params": geo.encoding.parameters(), "lr": 3e-2},
            {"params": list(geo.density_network.parameters()) + list(geo.feature_network.parameters()), "lr": 1e-2},
            {"params": [r.variance], "lr": 1e-2},
        ],
        eps=1e-15,
    )
    o_all = train_c["rays_o"].reshape(-1, 3)
    d_all = train_c["rays_d"].reshape(-1, 3)
    rgb_all = gt_train.reshape(-1, 3)
    light = train_c["light_positions"][:1]
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    r.train()
    for step in range(FIT_STEPS):
        geo.update_step(0, step)
        r.update_step(0, step)
        idx = torch.randint(0, o_all.shape[0], (FIT_RAYS,), generator=gen)
        out = r(rays_o=o_all[idx].view(1, 1, -1, 3), rays_d=d_all[idx].view(1, 1, -1, 3), light_positions=light)
        loss_eikonal = ((out["sdf_grad"].norm(dim=-1) - 1.0) ** 2).mean()
        loss = F.mse_loss(out["comp_rgb"].view(-1, 3), rgb_all[idx]) + FIT_LAMBDA_EIKONAL * loss_eikonal
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_time = time.time() - t0
    r.eval()
    with torch.no_grad():
        pred = r(**test_c)["comp_rgb"]
        sdf_err = float(geo.forward_sdf(surf).abs().mean())
    score = psnr(pred, gt_test)
    assert score >= FIT_MIN_PSNR, (
        f"held-out PSNR {score:.2f} dB < {FIT_MIN_PSNR} after {FIT_STEPS} steps ({train_time:.1f}s)"
    )
    # The zero level set moved from the initial sphere onto the ellipsoid (~0.08 -> ~0.01 mean |sdf|).
    assert sdf_err < 0.5 * sdf_err0 and sdf_err < 0.03, (sdf_err0, sdf_err)
    # The shell sharpened (s grew from ~20) and the band pruning followed it.
    assert float(r.inv_s.detach()) > 100.0
    assert r.occupancy.occupied_fraction < 0.4


def test_set_scene_with_new_radius_resets_the_grid():
    r = make_renderer(AnalyticSphereSDF(), grid_prune=True, num_samples_per_ray=16, variance=0.6)
    r.update_step(0, 0)
    assert r.occupancy.occupied_fraction < 0.5
    r.set_scene(geometry=AnalyticSphereSDF({"radius": 2.0}))
    assert r.occupancy.radius == 2.0 and r.occupancy.occupied_fraction == 1.0  # everything until updated
