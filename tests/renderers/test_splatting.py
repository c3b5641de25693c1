"""Gaussian splatting renderer: gradients, analytic footprint, depth order, module outputs, gsplat parity."""

from __future__ import annotations

import math

import pytest
import torch

from lift3d.backends import gsplat_backend
from lift3d.geometry.gaussians import GaussianModel
from lift3d.renderers.splatting import GaussianSplattingRenderer, project_gaussians, render_gaussians
from lift3d.utils.cameras import focal_from_fovy, make_cameras



def _cams(B, H, W, dist=2.5, fovy=40.0, elev=15.0, az0=0.0, az1=90.0, dtype=torch.float64):
    c = make_cameras(torch.full((B,), elev), torch.linspace(az0, az1, B), torch.full((B,), dist),
                     torch.full((B,), fovy), H, W)
    return {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in c.items()}


def _random_gaussians(N, seed=0, dtype=torch.float64, spread=0.3, smin=0.05, smax=0.15):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(N, 3, generator=g, dtype=dtype) * spread
    quats = torch.randn(N, 4, generator=g, dtype=dtype)
    log_s = torch.log(torch.rand(N, 3, generator=g, dtype=dtype) * (smax - smin) + smin)
    op_logit = torch.randn(N, generator=g, dtype=dtype)
    cols = torch.rand(N, 3, generator=g, dtype=dtype)
    return means, quats, log_s, op_logit, cols


def _stack(r):
    return torch.cat([r["rgb"], r["depth"], r["opacity"]], -1)


def test_gradcheck_float64_against_finite_differences():
    cam = _cams(1, 8, 8, dist=2.0)
    params = [t.clone().requires_grad_() for t in _random_gaussians(3, seed=1, spread=0.15, smin=0.1, smax=0.2)]

    def fn(means, quats, log_s, op_logit, cols):
        r = render_gaussians(means, quats, log_s.exp(), torch.sigmoid(op_logit), cols, cam["c2w"], cam["fovy"], 8, 8,
                             tile_size=4, chunk_elements=64, cache_elements=200)
        return _stack(r)

    assert fn(*params)[..., 4].max() > 0.2  # the Gaussians are actually in view
    # fast_mode checks random projections of the Jacobian: the same test of the backward, far fewer passes.
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_tiles_match_dense_reference_forward_and_backward():
    H, W = 27, 21  # not multiples of the tile size
    cam = _cams(2, H, W)
    params = [t.clone().requires_grad_() for t in _random_gaussians(40, seed=2)]

    def run(dense, cache=1 << 23):
        m, q, s, o, c = params
        return _stack(render_gaussians(m, q, s.exp(), torch.sigmoid(o), c, cam["c2w"], cam["fovy"], H, W,
                                       tile_size=8, chunk_elements=300, cache_elements=cache, dense=dense))

    b = run(True)
    assert b[..., 4].max() > 0.9
    up = torch.randn_like(b)
    gb = torch.autograd.grad((b * up).sum(), params)
    # Backward from cached intermediates, from recomputation, and from a budget that caches only some chunks.
    for cache in (1 << 23, 0, 3000):
        a = run(False, cache)
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
        ga = torch.autograd.grad((a * up).sum(), params)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-8)


def test_single_isotropic_gaussian_matches_analytic_footprint():
    H = W = 33  # odd: the image centre is a pixel centre
    cam = _cams(1, H, W, dist=2.0, fovy=40.0, elev=0.0, az0=0.0, az1=0.0)
    s, logit = 0.05, 0.7
    r = render_gaussians(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
                         torch.full((1, 3), s, dtype=torch.float64), torch.sigmoid(torch.tensor([logit], dtype=torch.float64)),
                         torch.tensor([[0.2, 0.4, 0.6]], dtype=torch.float64), cam["c2w"], cam["fovy"], H, W)
    op = r["opacity"][0, ..., 0]
    c = H // 2
    assert op.argmax().item() == c * W + c
    assert op[c, c].item() == pytest.approx(torch.sigmoid(torch.tensor(logit, dtype=torch.float64)).item(), abs=1e-9)
    f = focal_from_fovy(cam["fovy"], H).item()
    var = (f * s / 2.0) ** 2 + 0.3  # EWA: (f s / d)^2 plus the 0.3 px dilation
    for di, dj in [(0, 2), (3, 0), (2, -2)]:
        expect = torch.sigmoid(torch.tensor(logit, dtype=torch.float64)).item() * math.exp(-0.5 * (di * di + dj * dj) / var)
        assert op[c + di, c + dj].item() == pytest.approx(expect, rel=1e-6)
    # Colour is the Gaussian's colour scaled by its alpha; depth is alpha times the view distance.
    assert r["rgb"][0, c, c].tolist() == pytest.approx([0.2 * op[c, c].item(), 0.4 * op[c, c].item(), 0.6 * op[c, c].item()])
    assert r["depth"][0, c, c, 0].item() == pytest.approx(2.0 * op[c, c].item())


def test_antialiased_mode_scales_the_peak_by_the_dilation_compensation():
    H = W = 33
    cam = _cams(1, H, W, dist=2.0, fovy=40.0, elev=0.0, az0=0.0, az1=0.0)
    s, o = 0.004, 0.6  # about a fifth of a pixel wide
    args = (torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
            torch.full((1, 3), s, dtype=torch.float64), torch.tensor([o], dtype=torch.float64),
            torch.ones(1, 3, dtype=torch.float64), cam["c2w"], cam["fovy"], H, W)
    classic = render_gaussians(*args)["opacity"][0, ..., 0]
    aa = render_gaussians(*args, rasterize_mode="antialiased")["opacity"][0, ..., 0]
    var0 = (focal_from_fovy(cam["fovy"], H).item() * s / 2.0) ** 2
    c = H // 2
    assert classic[c, c].item() == pytest.approx(o, rel=1e-9)
    assert aa[c, c].item() == pytest.approx(o * var0 / (var0 + 0.3), rel=1e-6)  # sqrt(det ratio) of an isotropic 2x2


def test_antialiased_coverage_does_not_depend_on_the_dilation():
    # A faint Gaussian smaller than a pixel: the summed alpha over the image is its projected weight
    # o * 2 pi sqrt(det cov2d). Classic mode adds the dilation's area to it; antialiased mode keeps it.
    H = W = 41
    cam = _cams(1, H, W, dist=2.0, fovy=40.0, elev=0.0, az0=0.0, az1=0.0)
    s, o = 0.006, 0.02
    args = (torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
            torch.full((1, 3), s, dtype=torch.float64), torch.tensor([o], dtype=torch.float64),
            torch.ones(1, 3, dtype=torch.float64), cam["c2w"], cam["fovy"], H, W)
    var0 = (focal_from_fovy(cam["fovy"], H).item() * s / 2.0) ** 2
    kw = {"alpha_min": 1e-9}
    for eps in (0.3, 1.0):
        total_aa = render_gaussians(*args, eps2d=eps, rasterize_mode="antialiased", **kw)["opacity"].sum().item()
        total_classic = render_gaussians(*args, eps2d=eps, **kw)["opacity"].sum().item()
        assert total_aa == pytest.approx(o * 2 * math.pi * var0, rel=0.02)
        assert total_classic == pytest.approx(o * 2 * math.pi * (var0 + eps), rel=0.02)
    with pytest.raises(ValueError, match="rasterize_mode"):
        render_gaussians(*args, rasterize_mode="mip")


def test_projected_mean_matches_mvp_matrix():
    H, W = 40, 56
    cam = _cams(3, H, W, dist=2.2)
    means = torch.tensor([[0.3, -0.2, 0.1], [-0.25, 0.3, -0.15]], dtype=torch.float64)
    proj = project_gaussians(means, torch.tensor([[1.0, 0, 0, 0]] * 2, dtype=torch.float64),
                             torch.full((2, 3), 0.02, dtype=torch.float64), torch.linalg.inv(cam["c2w"]),
                             focal_from_fovy(cam["fovy"], H), H, W)
    hom = torch.cat([means, torch.ones(2, 1, dtype=torch.float64)], -1)
    clip = torch.einsum("bij,nj->bni", cam["mvp_mtx"], hom)
    ndc = clip[..., :2] / clip[..., 3:]
    pix = torch.stack([(ndc[..., 0] + 1) * 0.5 * W, (ndc[..., 1] + 1) * 0.5 * H], -1)
    torch.testing.assert_close(proj["means2d"], pix, atol=1e-4, rtol=1e-6)  # mvp_mtx is float32
    # The brightest rendered pixel of a small Gaussian is the one containing its projected mean.
    r = render_gaussians(means[:1], torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
                         torch.full((1, 3), 0.01, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64),
                         torch.ones(1, 3, dtype=torch.float64), cam["c2w"], cam["fovy"], H, W)
    for b in range(3):
        k = r["opacity"][b, ..., 0].argmax().item()
        assert (k // W, k % W) == (int(pix[b, 0, 1]), int(pix[b, 0, 0]))


def test_front_opaque_gaussian_hides_the_one_behind():
    H = W = 17
    cam = _cams(1, H, W, dist=2.0, elev=0.0, az0=0.0, az1=0.0)
    # Camera on +x: the Gaussian at x=0.3 is in front of the one at x=-0.3.
    means = torch.tensor([[-0.3, 0.0, 0.0], [0.3, 0.0, 0.0]], dtype=torch.float64)
    cols = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2, dtype=torch.float64)
    scales = torch.full((2, 3), 0.2, dtype=torch.float64)
    ops = torch.tensor([1.0, 1.0], dtype=torch.float64)
    c = H // 2
    for perm in ([0, 1], [1, 0]):  # the input order must not matter
        r = render_gaussians(means[perm], quats, scales, ops[perm], cols[perm], cam["c2w"], cam["fovy"], H, W)
        rgb = r["rgb"][0, c, c]
        assert rgb[0].item() > 0.98 and rgb[2].item() < 0.02
        assert r["depth"][0, c, c, 0].item() == pytest.approx(1.7, abs=0.03)


def test_renderer_module_outputs_background_and_viewspace_grad():
    geo = GaussianModel({"init": "ball:0.4", "n_init": 200, "init_opacity": 0.5, "seed": 0})
    rend = GaussianSplattingRenderer({}, geometry=geo, material=None, background=None)
    cam = _cams(2, 24, 32, dtype=torch.float32)
    out = rend(**cam, bg_color=torch.tensor([1.0, 1.0, 1.0]))
    assert out["comp_rgb"].shape == (2, 24, 32, 3) and out["opacity"].shape == (2, 24, 32, 1)
    assert out["depth"].shape == (2, 24, 32, 1) and out["comp_rgb_fg"].shape == (2, 24, 32, 3)
    torch.testing.assert_close(out["comp_rgb"], out["comp_rgb_fg"] + (1 - out["opacity"]))
    assert out["opacity"][:, 0, 0].max() < 1e-3 and out["comp_rgb"][:, 0, 0].min() > 0.999  # corner: background
    assert out["visibility_filter"].shape == (2, 200) and out["radii"].shape == (2, 200)
    out["comp_rgb"].mean().backward()
    vs = out["viewspace_points"].grad
    assert vs is not None and vs.shape == (2, 200, 2)
    assert (vs[out["visibility_filter"]].norm(dim=-1) > 0).float().mean() > 0.5
    assert torch.all(vs[~out["visibility_filter"]] == 0)
    assert geo.xyz.grad is not None and geo.xyz.grad.abs().sum() > 0


def test_renderer_uses_background_module_when_no_bg_color():
    class Sky(torch.nn.Module):
        def forward(self, dirs):
            return (dirs * 0.5 + 0.5)

    geo = GaussianModel({"init": "ball:0.3", "n_init": 50, "seed": 0})
    rend = GaussianSplattingRenderer({"backend": "torch"}, geometry=geo, background=Sky())
    cam = _cams(1, 16, 16, dtype=torch.float32)
    out = rend(**cam)
    torch.testing.assert_close(out["comp_rgb"], out["comp_rgb_fg"] + (1 - out["opacity"]) * (cam["rays_d"] * 0.5 + 0.5))


def test_sh_colour_is_view_dependent():
    geo = GaussianModel({"init": "ball:0.3", "n_init": 30, "seed": 0, "sh_degree": 2, "sh_degree_interval": 0})
    with torch.no_grad():
        geo.features_rest.normal_(0, 0.3)
    c = geo.colors(torch.tensor([[2.0, 0, 0], [0, 2.0, 0]]))
    assert c.shape == (2, 30, 3) and (c[0] - c[1]).abs().max() > 0.05
    geo.features_rest.data.zero_()
    c = geo.colors(torch.tensor([[2.0, 0, 0], [0, 2.0, 0]]))
    torch.testing.assert_close(c[0], c[1])


@pytest.mark.skipif(not torch.cuda.is_available() or not gsplat_backend.available(),
                    reason="gsplat parity needs CUDA and gsplat installed")
@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_gsplat_matches_torch_path(mode):
    dev = torch.device("cuda")
    cam = _cams(2, 32, 48, dtype=torch.float32)
    m, q, s, o, c = (t.float().to(dev).requires_grad_() for t in _random_gaussians(100, seed=3))
    ref = render_gaussians(m, q, s.exp(), torch.sigmoid(o), c, cam["c2w"].to(dev), cam["fovy"].to(dev), 32, 48,
                           rasterize_mode=mode)
    gs = gsplat_backend.render(m, q, s.exp(), torch.sigmoid(o), c, cam["c2w"].to(dev), cam["fovy"].to(dev), 32, 48,
                               rasterize_mode=mode)
    for k in ("rgb", "opacity", "depth"):
        torch.testing.assert_close(gs[k], ref[k], atol=2e-3, rtol=1e-3)
    up = torch.randn_like(ref["rgb"])
    g_ref = torch.autograd.grad((ref["rgb"] * up).sum(), (m, c))
    g_gs = torch.autograd.grad((gs["rgb"] * up).sum(), (m, c))
    for a, b in zip(g_gs, g_ref):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_float32_matches_float64():
    H = W = 40
    cam = _cams(1, H, W)
    outs, grads = [], []
    for dt in (torch.float32, torch.float64):
        p = [t.to(dt).requires_grad_() for t in _random_gaussians(300, seed=4, smin=0.01, smax=0.05)]
        r = render_gaussians(p[0], p[1], p[2].exp(), torch.sigmoid(p[3]), p[4], cam["c2w"].to(dt), cam["fovy"].to(dt), H, W)
        x = _stack(r).double()
        outs.append(x)
        grads.append([g.double() for g in torch.autograd.grad((x[..., :3] ** 2).sum() + x[..., 4].sum(), p)])
    assert outs[1][..., 4].max() > 0.9
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    for a, b in zip(*grads):
        assert ((a - b).norm() / b.norm()).item() < 1e-3
