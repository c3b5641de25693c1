"""NeRF volume renderer: compositing vs nerfacc, analytic scenes, occupancy pruning, fitting."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from lift3d.backends import nerfacc_backend
from lift3d.backgrounds.base import BaseBackground
from lift3d.geometry.base import BaseImplicitGeometry
from lift3d.materials.base import BaseMaterial
from lift3d.registry import find
from lift3d.renderers.volume import composite_weights, ray_box_intersect, ray_sphere_intersect
from lift3d.utils.cameras import make_cameras



# ------------------------------------------------------------------------------------------------
# Tiny stand-ins for the real materials/backgrounds (not registered).


class SigmoidMaterial(BaseMaterial):
    """rgb = sigmoid(features[:3])."""

    def forward(self, features, **kwargs):
        return torch.sigmoid(features[..., :3])


class NormalMaterial(SigmoidMaterial):
    requires_normal = True

    def forward(self, features, shading_normal=None, **kwargs):
        assert shading_normal is not None
        return torch.sigmoid(features[..., :3])


class ConstBackground(BaseBackground):
    @dataclass
    class Config(BaseBackground.Config):
        value: float = 1.0

    def forward(self, dirs):
        return torch.full_like(dirs, self.cfg.value)


class ColouredBall(BaseImplicitGeometry):
    """A dense ball of radius 0.5 with a smooth colour gradient: the ground truth scene."""

    def forward(self, points, output_normal=False):
        r = points.norm(dim=-1, keepdim=True)
        density = 60.0 * torch.sigmoid((0.5 - r) / 0.01)
        colour = 0.5 + 0.4 * torch.tanh(2.0 * points)  # [..., 3] in (0.1, 0.9)
        out = {"density": density, "features": torch.logit(colour)}
        if output_normal:
            out["normal"] = F.normalize(points, dim=-1)
        return out

    def forward_density(self, points):
        return self.forward(points)["density"]


def make_renderer(geometry, material=None, **cfg):
    base = {"num_samples_per_ray": 128, "randomized": False, "grid_prune": False}
    base.update(cfg)
    return find("nerf-volume-renderer")(
        base, geometry=geometry, material=material or SigmoidMaterial(), background=ConstBackground({"value": 1.0})
    )


def cams(az, el=15.0, res=16, dist=2.0):
    az = torch.as_tensor(az, dtype=torch.float32).reshape(-1)
    n = az.shape[0]
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    el_t = torch.as_tensor(el, dtype=torch.float32).reshape(-1).expand(n).clone()
    return make_cameras(el_t, az, full(dist), full(40.0), res, res)


def psnr(a, b):
    return -10.0 * math.log10(float(((a - b) ** 2).mean()) + 1e-12)


# ------------------------------------------------------------------------------------------------


def test_composite_weights_formula_and_gradients():
    torch.manual_seed(0)
    t = torch.sort(torch.rand(3, 9, dtype=torch.float64) * 3, dim=-1)[0]
    ts, te = t[:, :-1], t[:, 1:]
    sig = (torch.rand(3, 8, dtype=torch.float64) * 4).requires_grad_(True)
    w, trans, alpha = composite_weights(sig, ts, te)
    sd = sig * (te - ts)
    expect_T = torch.exp(-torch.cat([torch.zeros(3, 1, dtype=sd.dtype), torch.cumsum(sd, -1)[:, :-1]], -1))
    torch.testing.assert_close(trans, expect_T)
    torch.testing.assert_close(w, expect_T * (1 - torch.exp(-sd)))
    # Opacity is 1 - T_final.
    torch.testing.assert_close(w.sum(-1), 1 - torch.exp(-sd.sum(-1)))
    assert torch.autograd.gradcheck(lambda s: composite_weights(s, ts, te)[0], (sig,))


@pytest.mark.skipif(not nerfacc_backend.importable(), reason="nerfacc not installed (pip install --no-deps nerfacc)")
def test_composite_matches_nerfacc_dense_path():
    torch.manual_seed(1)
    t = torch.sort(torch.rand(64, 129) * 4, dim=-1)[0]
    ts, te = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    sig = (torch.rand(64, 128) * 20) * (torch.rand(64, 128) > 0.5)
    s1 = sig.clone().requires_grad_(True)
    s2 = sig.clone().requires_grad_(True)
    w1, t1, a1 = composite_weights(s1, ts, te)
    w2, t2, a2 = nerfacc_backend.render_weights_dense(ts, te, s2)
    for x, y in ((w1, w2), (t1, t2), (a1, a2)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    g = torch.randn_like(w1)
    (w1 * g).sum().backward()
    (w2 * g).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-5, rtol=1e-5)


def test_ray_intersections():
    o = torch.tensor([[2.0, 0.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    tn, tf = ray_box_intersect(o, d, 1.0)
    assert torch.allclose(tn[0], torch.tensor(1.0)) and torch.allclose(tf[0], torch.tensor(3.0))
    assert tf[1] <= tn[1]  # miss
    assert torch.allclose(tf[2], torch.tensor(1.0))
    tn, tf = ray_sphere_intersect(o, d, 1.0)
    assert torch.allclose(tn[0], torch.tensor(1.0)) and torch.allclose(tf[0], torch.tensor(3.0))
    assert tf[1] <= tn[1]


def test_render_analytic_ball_opacity_depth_normals():
    geo = ColouredBall()
    r = make_renderer(geo, material=NormalMaterial(), num_samples_per_ray=192)
    r.eval()
    c = cams([0.0, 90.0], el=0.0, res=9)
    out = r(**c)
    assert out["comp_rgb"].shape == (2, 9, 9, 3)
    assert out["opacity"].shape == (2, 9, 9, 1) and out["depth"].shape == (2, 9, 9, 1)
    mid = out["opacity"][:, 4, 4, 0]
    assert torch.all(mid > 0.99)
    # Surface of the ball seen from distance 2 along the axis: depth 1.5.
    assert torch.allclose(out["depth"][:, 4, 4, 0], torch.full((2,), 1.5), atol=0.02)
    # Corners miss the ball: transparent, so comp_rgb is the white background.
    assert torch.all(out["opacity"][:, 0, 0, 0] < 1e-3)
    assert torch.allclose(out["comp_rgb"][:, 0, 0], torch.ones(2, 3), atol=1e-3)
    # Normals: camera at azimuth 0 sees +x, at azimuth 90 sees +y; mapped (n + 1) / 2.
    n0 = out["comp_normal"][0, 4, 4]
    n1 = out["comp_normal"][1, 4, 4]
    assert torch.allclose(n0, torch.tensor([1.0, 0.5, 0.5]), atol=0.03)
    assert torch.allclose(n1, torch.tensor([0.5, 1.0, 0.5]), atol=0.03)
    # Colour at the centre of view 0 is the ball's colour at (0.5, 0, 0).
    expect = 0.5 + 0.4 * torch.tanh(torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(out["comp_rgb"][0, 4, 4], expect, atol=0.02)
    # Packed outputs line up.
    nv = out["weights"].shape[0]
    for k, dim in (("points", 3), ("t_points", 1), ("t_intervals", 1), ("t_dirs", 3), ("normal", 3)):
        assert out[k].shape == (nv, dim), k
    assert out["ray_indices"].shape == (nv,)
    per_ray = torch.zeros(2 * 9 * 9).index_add(0, out["ray_indices"], out["weights"][:, 0])
    assert torch.allclose(per_ray, out["opacity"].reshape(-1), atol=1e-5)


def test_background_color_forms():
    geo = ColouredBall()
    r = make_renderer(geo, num_samples_per_ray=32)
    r.eval()
    c = cams([0.0, 180.0], res=8)
    o3 = r(**c, bg_color=torch.tensor([0.0, 1.0, 0.0]))
    ob = r(**c, bg_color=torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(o3["comp_rgb"][:, 0, 0], torch.tensor([0.0, 1.0, 0.0]).expand(2, 3), atol=1e-3)
    assert torch.allclose(ob["comp_rgb"][1, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)
    full = torch.rand(2, 8, 8, 3)
    of = r(**c, bg_color=full)
    torch.testing.assert_close(of["comp_rgb_fg"] + full * (1 - of["opacity"]), of["comp_rgb"])


def test_occupancy_pruning_skips_empty_space_and_keeps_image():
    geo = ColouredBall()
    c = cams([30.0, 200.0], res=16)
    ref = make_renderer(geo, num_samples_per_ray=96)
    ref.eval()
    pr = make_renderer(geo, num_samples_per_ray=96, grid_prune=True, grid_resolution=32)
    pr.eval()
    pr.update_step(0, 0)  # warm-up update: every cell
    frac = pr.occupancy.occupied_fraction
    # Ball of radius 0.5 in a box of radius 1: ~6.5% of the volume, ~10% with the dilated boundary cells.
    assert 0.05 < frac < 0.2
    a = ref(**c)
    b = pr(**c)
    assert b["weights"].shape[0] < 0.35 * a["weights"].shape[0]
    torch.testing.assert_close(a["comp_rgb"], b["comp_rgb"], atol=2e-3, rtol=0)
    torch.testing.assert_close(a["opacity"], b["opacity"], atol=2e-3, rtol=0)


def test_early_stop_drops_samples_behind_the_surface_and_keeps_the_image():
    geo = ColouredBall()
    c = cams([30.0, 200.0], res=16)
    ref = make_renderer(geo, num_samples_per_ray=96)
    es = make_renderer(geo, num_samples_per_ray=96, early_stop_eps=1e-4)
    a, b = ref(**c), es(**c)
    # The ball is opaque: about half of each hitting ray's samples lie past the front surface.
    assert b["weights"].shape[0] < 0.8 * a["weights"].shape[0]
    torch.testing.assert_close(a["opacity"], b["opacity"], atol=1e-4, rtol=0)
    torch.testing.assert_close(a["comp_rgb"], b["comp_rgb"], atol=1e-4, rtol=0)
    # Every kept sample was reached with transmittance above the threshold.
    ray = b["ray_indices"]  # packed, ray by ray
    sd = b["density"][:, 0] * b["t_intervals"][:, 0]
    excl = torch.cumsum(sd, 0) - sd
    in_front = excl - excl[torch.searchsorted(ray, ray)]  # optical depth before each sample, per ray
    assert float(torch.exp(-in_front).min()) > 1e-4
    # Gradients reach the same parameters of the field in training.
    geo_t = find("implicit-volume")({"radius": 1.0, "density_bias": "blob_magic3d", "n_feature_dims": 3,
                                     "pos_encoding_config": {"n_levels": 4, "log2_hashmap_size": 12}})
    r = make_renderer(geo_t, num_samples_per_ray=64, early_stop_eps=1e-4)
    r.train()
    r(**c)["comp_rgb"].mean().backward()
    assert geo_t.encoding.embeddings.grad.abs().sum() > 0


def test_eval_chunking_matches_single_pass():
    geo = ColouredBall()
    r = make_renderer(geo, num_samples_per_ray=48)
    r.eval()
    c = cams([45.0], res=12)
    one = r(**c)
    r.cfg.eval_chunk_size = 50
    many = r(**c)
    for k in ("comp_rgb", "opacity", "depth"):
        torch.testing.assert_close(one[k], many[k])
    torch.testing.assert_close(one["ray_indices"], many["ray_indices"])


def test_sdf_geometry_is_rejected_with_a_clear_error():
    geo = find("implicit-sdf")({"pos_encoding_config": {"n_levels": 4, "log2_hashmap_size": 10}})
    r = make_renderer(geo, num_samples_per_ray=8)
    with pytest.raises(TypeError, match="density"):
        r(**cams([0.0], res=4))


def test_old_implementation_key_says_it_is_now_backend():
    from lift3d.config import ConfigError

    with pytest.raises(ConfigError, match=r"'implementation' for nerf-volume-renderer was renamed to 'backend'; "
                                          r"write 'backend: nerfacc' \(one of 'auto', 'torch', 'nerfacc'\)"):
        make_renderer(ColouredBall(), implementation="nerfacc")


def test_training_jitter_changes_samples_but_not_expectation():
    geo = ColouredBall()
    r = make_renderer(geo, num_samples_per_ray=64, randomized=True)
    r.train()
    c = cams([0.0], res=8)
    torch.manual_seed(0)
    a = r(**c)
    b = r(**c)
    assert not torch.equal(a["t_points"], b["t_points"])
    torch.testing.assert_close(a["opacity"], b["opacity"], atol=0.02, rtol=0)


# ------------------------------------------------------------------------------------------------
# Fitting: implicit-volume learns the coloured ball from 8 views and generalises to 2 held-out views.

FIT_RES = 20
FIT_STEPS = 150
FIT_RAYS = 512
FIT_MIN_PSNR = 26.0  # dB on held-out views; an untrained field scores ~10 dB, 150 steps reach ~30 dB


def test_implicit_volume_fits_multiview_renders():
    """~10 s of CPU on one core: 150 steps of 512 rays x 32 samples (occupancy-pruned)."""
    torch.manual_seed(0)
    gt_geo = ColouredBall()
    gt_r = make_renderer(gt_geo, num_samples_per_ray=64)
    gt_r.eval()
    train_c = cams(torch.arange(8) * 45.0, el=torch.tensor([15.0, -10.0] * 4), res=FIT_RES)
    test_c = cams([22.5, 202.5], el=[30.0, 0.0], res=FIT_RES)
    with torch.no_grad():
        gt_train = gt_r(**train_c)["comp_rgb"]
        gt_test = gt_r(**test_c)["comp_rgb"]

    geo = find("implicit-volume")(
        {
            "radius": 1.0,
            "pos_encoding_config": {"n_levels": 8, "log2_hashmap_size": 14, "base_resolution": 8,
                                    "per_level_scale": 1.5},
            "mlp_network_config": {"n_neurons": 32, "n_hidden_layers": 1},
            "density_bias": "blob_magic3d",
            "density_blob_scale": 5.0,
            "backend": "torch",
        }
    )
    r = make_renderer(geo, num_samples_per_ray=32, randomized=True, grid_prune=True, grid_resolution=24,
                      occ_update_interval=8, occ_warmup_steps=64)
    opt = torch.optim.Adam(
        [
            {"params": geo.encoding.parameters(), "lr": 3e-2},
            {"params": list(geo.density_network.parameters()) + list(geo.feature_network.parameters()), "lr": 1e-2},
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
        loss = F.mse_loss(out["comp_rgb"].view(-1, 3), rgb_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_time = time.time() - t0
    r.eval()
    with torch.no_grad():
        pred = r(**test_c)["comp_rgb"]
    score = psnr(pred, gt_test)
    assert score >= FIT_MIN_PSNR, f"held-out PSNR {score:.2f} dB < {FIT_MIN_PSNR} after {FIT_STEPS} steps ({train_time:.1f}s)"
    # The occupancy grid learned the ball: far fewer cells than the box are kept.
    assert r.occupancy.occupied_fraction < 0.3


@pytest.mark.skipif(not torch.cuda.is_available() or not nerfacc_backend.available(),
                    reason="nerfacc CUDA path needs CUDA and nerfacc")
@pytest.mark.parametrize("early_stop_eps", [0.0, 1e-4])
def test_nerfacc_cuda_path_matches_torch_path(early_stop_eps):
    geo = ColouredBall().cuda()
    c = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in cams([30.0, 150.0], res=24).items()}
    outs = []
    for backend in ("torch", "nerfacc"):
        r = make_renderer(geo, num_samples_per_ray=256, grid_prune=True, backend=backend,
                          early_stop_eps=early_stop_eps).cuda()
        r.eval()
        for step in range(0, 64, 16):
            r.update_step(0, step)
        with torch.no_grad():
            outs.append(r(**c))
    a, b = outs
    # Different marching (bins vs nerfacc's fixed steps), same integral: close, not identical.
    torch.testing.assert_close(a["opacity"], b["opacity"], atol=0.03, rtol=0)
    torch.testing.assert_close(a["comp_rgb"], b["comp_rgb"], atol=0.03, rtol=0)
    torch.testing.assert_close(a["depth"], b["depth"], atol=0.05, rtol=0)
    # Packed compositing of nerfacc equals ours on the same packed samples.
    ts = b["t_points"][:, 0] - 0.5 * b["t_intervals"][:, 0]
    te = ts + b["t_intervals"][:, 0]
    w = nerfacc_backend.render_weights_packed(ts, te, b["density"][:, 0], b["ray_indices"], 2 * 24 * 24)
    torch.testing.assert_close(w, b["weights"][:, 0], atol=1e-5, rtol=0)


def test_set_scene_with_new_radius_resets_the_grid():
    geo = ColouredBall()
    r = make_renderer(geo, grid_prune=True, num_samples_per_ray=16)
    r.update_step(0, 0)
    assert r.occupancy.occupied_fraction < 0.3
    big = ColouredBall({"radius": 2.0})
    r.set_scene(geometry=big)
    assert r.occupancy.radius == 2.0 and r.occupancy.occupied_fraction == 1.0  # everything until updated
