"""Golden images: three small fixed scenes rendered deterministically and compared with stored PNGs.

Each scene is first checked against an independent, analytic account of what it must look like
(ray-sphere and ray-box intersections, Lambert's law, EWA footprints composited front to back), so
a stored image is a checked one, not a snapshot of whatever the renderer did that day. Then the
render (RGB, opacity as alpha, 8-bit) must match ``golden/<scene>.png`` to within 2/255 per value.

Regenerate the PNGs after an intended change with ``LIFT3D_UPDATE_GOLDEN=1 pytest
tests/renderers/test_golden_images.py``; the analytic checks still have to pass for a file to be
written.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lift3d.geometry.base import BaseGeometry, BaseImplicitGeometry
from lift3d.geometry.gaussians import GaussianModel
from lift3d.registry import find
from lift3d.utils.cameras import focal_from_fovy, make_cameras
from lift3d.utils.mesh import Mesh

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("LIFT3D_UPDATE_GOLDEN", "") == "1"
TOLERANCE = 2  # in 1/255 steps, per channel and pixel
SIZE = 32
BG = (0.1, 0.2, 0.3)


def to_rgba8(rgb: torch.Tensor, opacity: torch.Tensor) -> np.ndarray:
    """[H, W, 3] and [H, W, 1] in [0, 1] -> [H, W, 4] uint8 (opacity in the alpha channel)."""
    img = torch.cat([rgb, opacity], -1).detach().double().clamp(0.0, 1.0)
    return (img * 255.0).round().to(torch.uint8).cpu().numpy()


def check_golden(name: str, rgb: torch.Tensor, opacity: torch.Tensor, tmp_path: Path,
                 directory: Path = GOLDEN_DIR, update: bool = UPDATE) -> None:
    """Compare with (or, with ``update``, write) ``directory/<name>.png``; a failure saves the render."""
    from PIL import Image

    actual = to_rgba8(rgb, opacity)
    path = directory / f"{name}.png"
    if update:
        directory.mkdir(parents=True, exist_ok=True)
        Image.fromarray(actual, mode="RGBA").save(path)
        return
    if not path.exists():
        pytest.fail(f"no golden image {path}; create it with LIFT3D_UPDATE_GOLDEN=1")
    expected = np.asarray(Image.open(path).convert("RGBA"))
    assert expected.shape == actual.shape, f"{path}: {expected.shape} stored, {actual.shape} rendered"
    diff = np.abs(expected.astype(np.int16) - actual.astype(np.int16))
    if diff.max() > TOLERANCE:
        out = tmp_path / f"{name}-actual.png"
        Image.fromarray(actual, mode="RGBA").save(out)
        mse = float(((expected / 255.0 - actual / 255.0) ** 2).mean())
        psnr = -10.0 * math.log10(max(mse, 1e-20))
        bad = int((diff > TOLERANCE).any(-1).sum())
        pytest.fail(f"{name}: {bad} pixel(s) differ from {path} by up to {int(diff.max())}/255 (PSNR {psnr:.1f} dB); "
                    f"render saved to {out}. If the change is intended, rerun with LIFT3D_UPDATE_GOLDEN=1")


def cameras(elevation: float, azimuth: float, distance: float = 2.0, fovy: float = 40.0,
            light: tuple[float, float, float] | None = None) -> dict:
    lp = None if light is None else torch.tensor([light])
    return make_cameras(torch.tensor([elevation]), torch.tensor([azimuth]), torch.tensor([distance]),
                        torch.tensor([fovy]), SIZE, SIZE, light_positions=lp)


def background():
    return find("solid-color-background", "background")({"color": list(BG)})


def ray_sphere(o: torch.Tensor, d: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rays [..., 3] (unit d) -> (distance of the ray from the centre, entry t, hit) for a centred sphere."""
    b = (o * d).sum(-1)
    closest = o - b[..., None] * d
    dist = closest.norm(dim=-1)
    half = torch.sqrt((radius**2 - dist**2).clamp(min=0.0))
    return dist, -b - half, dist < radius


def ray_box(o: torch.Tensor, d: torch.Tensor, half: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rays [..., 3] -> (entry t, hit, entry axis in 0..2) for the box [-half, half]^3 (slab method)."""
    inv = 1.0 / d
    ta, tb = (-half - o) * inv, (half - o) * inv
    tmin, tmax = torch.minimum(ta, tb), torch.maximum(ta, tb)
    t_near, axis = tmin.max(-1)
    t_far = tmax.min(-1).values
    return t_near, t_far > t_near, axis


# ------------------------------------------------------------------------------------------------
# Scene 1: volume rendering of an analytic density and colour field.


def ball_colour(p: torch.Tensor) -> torch.Tensor:
    return (0.5 + 0.8 * p).clamp(0.0, 1.0)


class AnalyticBall(BaseImplicitGeometry):
    """Density ~300 inside |x| < 0.5 with a 0.004-wide sigmoid edge; colour 0.5 + 0.8 x."""

    def forward(self, points, output_normal=False):
        r = points.norm(dim=-1, keepdim=True)
        out = {"density": 300.0 * torch.sigmoid((0.5 - r) / 0.004), "features": ball_colour(points)}
        if output_normal:
            out["normal"] = F.normalize(points, dim=-1)
        return out


def test_golden_volume_render_of_an_analytic_ball(tmp_path):
    geo = AnalyticBall({"radius": 0.8})
    mat = find("neural-radiance-material", "material")({"color_activation": "none"})
    r = find("nerf-volume-renderer", "renderer")(
        {"num_samples_per_ray": 384, "randomized": False, "grid_prune": False},
        geometry=geo, material=mat, background=background())
    r.eval()
    cam = cameras(20.0, 30.0)
    with torch.no_grad():
        out = r(**cam)
    rgb, op = out["comp_rgb"][0], out["opacity"][0]

    # Independent account 1: the emission-absorption integral along each pixel's ray by a dense
    # float64 quadrature (~30x finer than the renderer's bins), over the same background.
    o, d = cam["rays_o"][0].double(), F.normalize(cam["rays_d"][0].double(), dim=-1)
    t = torch.linspace(1.45, 2.55, 4401, dtype=torch.float64)  # the ball lies within 1.5..2.5 of the camera
    dt = t[1] - t[0]
    ref_rgb = torch.zeros(SIZE, SIZE, 3, dtype=torch.float64)
    ref_op = torch.zeros(SIZE, SIZE, 1, dtype=torch.float64)
    for i in range(SIZE):
        pts = o[i, :, None] + d[i, :, None] * t[None, :, None]  # [W, T, 3]
        field = geo(pts)
        sd = field["density"][..., 0] * dt
        w = torch.exp(-(torch.cumsum(sd, -1) - sd)) * (1 - torch.exp(-sd))  # [W, T]
        ref_rgb[i] = (w[..., None] * field["features"]).sum(1)
        ref_op[i] = w.sum(1, keepdim=True)
    ref_rgb = ref_rgb + (1 - ref_op) * torch.tensor(BG, dtype=torch.float64)
    assert (op.double() - ref_op).abs().max() < 0.02
    assert (rgb.double() - ref_rgb).abs().max() < 0.02
    # Independent account 2: away from the rim, a pixel is fully covered iff its ray meets the ball
    # (the projected disc), and it takes the colour of the point where its ray enters the ball.
    dist, t_in, hit = ray_sphere(o, d, 0.5)
    rim = (dist - 0.5).abs() < 0.03
    assert 150 < int(hit.sum()) < SIZE * SIZE - 150
    assert (op[hit & ~rim] > 0.99).all() and (op[~hit & ~rim] < 0.04).all()
    expect = ball_colour(o + t_in[..., None] * d)
    assert (rgb[hit & ~rim].double() - expect[hit & ~rim]).abs().max() < 0.02
    c = SIZE // 2
    assert torch.allclose(rgb[c, c].double(), expect[c, c], atol=0.01)  # the centre pixel, explicitly
    check_golden("volume_ball", rgb, op, tmp_path)


# ------------------------------------------------------------------------------------------------
# Scene 2: a rasterized cube with position colours under the diffuse material.

CUBE_HALF = 0.35
LIGHT = (1.0, 0.4, 1.6)  # direction towards a directional light
AMBIENT, DIFFUSE = 0.3, 0.7


def cube_albedo(p: torch.Tensor) -> torch.Tensor:
    return (0.5 + p / (2.0 * CUBE_HALF) * 0.8).clamp(0.0, 1.0)


class ColouredCube(BaseGeometry):
    """An axis-aligned cube mesh; features are an albedo that varies linearly with position."""

    def configure(self, **kwargs):
        super().configure(**kwargs)
        h = CUBE_HALF
        v = torch.tensor([[x, y, z] for x in (-h, h) for y in (-h, h) for z in (-h, h)], dtype=torch.float32)
        # Two triangles per face, counter-clockwise seen from outside (index = 4 x + 2 y + z).
        f = torch.tensor([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                          [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
        self.mesh = Mesh(v, f)

    def isosurface(self):
        return self.mesh

    def export_attributes(self, points):
        return {"features": cube_albedo(points)}


def test_cube_mesh_is_closed_and_outward():
    m = ColouredCube({}).mesh
    centroids = m.v_pos[m.t_pos_idx].mean(1)
    assert ((m.face_normals() * centroids).sum(-1) > 0).all()


def test_golden_rasterized_cube_with_diffuse_material(tmp_path):
    geo = ColouredCube({})
    mat = find("diffuse-with-point-light-material", "material")(
        {"albedo_activation": "none", "ambient_light_color": [AMBIENT] * 3, "diffuse_light_color": [DIFFUSE] * 3,
         "light_type": "directional"})
    r = find("mesh-rasterizer", "renderer")({"backend": "torch", "normal_type": "face"}, geometry=geo,
                                            material=mat, background=background())
    r.eval()
    mat.eval()
    cam = cameras(30.0, 40.0, distance=2.2, light=LIGHT)
    with torch.no_grad():
        out = r(**cam)
    rgb, op = out["comp_rgb"][0], out["opacity"][0]

    # Independent account: cast each pixel's ray at the box; the colour is albedo x Lambert with the
    # normal of the face the ray enters. Edge pixels (antialiased) are left out.
    o, d = cam["rays_o"][0].double(), F.normalize(cam["rays_d"][0].double(), dim=-1)
    t, hit, axis = ray_box(o, d, CUBE_HALF)
    p = o + t[..., None] * d
    normal = torch.zeros_like(p).scatter_(-1, axis[..., None], 1.0) * torch.sign(p)
    lam = (normal * F.normalize(torch.tensor(LIGHT, dtype=torch.float64), dim=0)).sum(-1).clamp(min=0.0)
    expect = (cube_albedo(p) * (AMBIENT + DIFFUSE * lam)[..., None]).clamp(0.0, 1.0)
    label = torch.where(hit, axis * 2 + (p.gather(-1, axis[..., None])[..., 0] > 0).long(), torch.full_like(axis, -1))
    padded = F.pad(label[None, None].double(), (1, 1, 1, 1), mode="replicate")[0, 0]
    same = torch.stack([padded[1 + di : 1 + di + SIZE, 1 + dj : 1 + dj + SIZE] == label.double()
                        for di in (-1, 0, 1) for dj in (-1, 0, 1)]).all(0)
    inner, outer = same & hit, same & ~hit
    assert int(inner.sum()) > 150 and len(set(label[inner].tolist())) == 3  # three faces in view
    assert (rgb[inner].double() - expect[inner]).abs().max() < 2e-3
    assert (op[inner] == 1).all() and (op[outer] == 0).all()
    assert torch.allclose(rgb[outer], torch.tensor(BG).expand_as(rgb[outer]))
    c = SIZE // 2
    assert bool(hit[c, c]) and torch.allclose(rgb[c, c].double(), expect[c, c], atol=2e-3)
    check_golden("raster_cube", rgb, op, tmp_path)


# ------------------------------------------------------------------------------------------------
# Scene 3: a few Gaussians splatted.

G_MEANS = [[0.2, 0.05, 0.0], [-0.1, 0.3, 0.15], [-0.25, -0.35, -0.15], [0.05, 0.12, 0.25]]
G_SCALES = [0.12, 0.08, 0.1, 0.06]
G_OPACITIES = [0.9, 0.6, 0.8, 0.4]
G_COLOURS = [[0.9, 0.2, 0.1], [0.1, 0.8, 0.3], [0.2, 0.3, 0.9], [0.95, 0.9, 0.2]]


def splat_reference(cam: dict, alpha_min: float = 1.0 / 255.0, alpha_max: float = 0.99, eps2d: float = 0.3):
    """EWA splatting of the isotropic Gaussians above, composited front to back: (rgb, opacity) [H, W, .]."""
    means = torch.tensor(G_MEANS, dtype=torch.float64)
    w2c = torch.linalg.inv(cam["c2w"][0].double())
    pc = means @ w2c[:3, :3].T + w2c[:3, 3]  # camera frame, looking down -z
    depth = -pc[:, 2]
    f = float(focal_from_fovy(cam["fovy"], SIZE)[0])
    u = SIZE / 2 + f * pc[:, 0] / depth
    v = SIZE / 2 - f * pc[:, 1] / depth
    jac = torch.zeros(len(G_MEANS), 2, 3, dtype=torch.float64)
    jac[:, 0, 0] = f / depth
    jac[:, 0, 2] = f * pc[:, 0] / depth**2
    jac[:, 1, 1] = -f / depth
    jac[:, 1, 2] = -f * pc[:, 1] / depth**2
    s2 = torch.tensor(G_SCALES, dtype=torch.float64) ** 2
    cov2 = s2[:, None, None] * jac @ jac.transpose(1, 2) + eps2d * torch.eye(2, dtype=torch.float64)
    conic = torch.linalg.inv(cov2)
    jj, ii = torch.meshgrid(torch.arange(SIZE, dtype=torch.float64) + 0.5,
                            torch.arange(SIZE, dtype=torch.float64) + 0.5, indexing="xy")
    rgb = torch.zeros(SIZE, SIZE, 3, dtype=torch.float64)
    trans = torch.ones(SIZE, SIZE, dtype=torch.float64)
    for k in torch.argsort(depth).tolist():
        dx, dy = jj - u[k], ii - v[k]
        maha = conic[k, 0, 0] * dx * dx + 2 * conic[k, 0, 1] * dx * dy + conic[k, 1, 1] * dy * dy
        a = (G_OPACITIES[k] * torch.exp(-0.5 * maha)).clamp(max=alpha_max)
        a = torch.where(a >= alpha_min, a, torch.zeros_like(a))
        rgb += (trans * a)[..., None] * torch.tensor(G_COLOURS[k], dtype=torch.float64)
        trans = trans * (1 - a)
    return rgb, (1 - trans)[..., None], (u, v)


def test_golden_splatted_gaussians(tmp_path):
    geo = GaussianModel({"init": "points", "color_mode": "rgb", "radius": 0.8, "init_opacity": 0.5},
                        init_points=torch.tensor(G_MEANS), init_colors=torch.tensor(G_COLOURS))
    with torch.no_grad():
        geo.scaling.copy_(torch.log(torch.tensor(G_SCALES))[:, None].expand(-1, 3))
        geo.opacity.copy_(torch.logit(torch.tensor(G_OPACITIES))[:, None])
    r = find("gaussian-splatting-renderer", "renderer")({"backend": "torch"}, geometry=geo, material=None,
                                                        background=background())
    r.eval()
    cam = cameras(15.0, 20.0, distance=2.0)
    with torch.no_grad():
        out = r(**cam)
    rgb, op = out["comp_rgb"][0], out["opacity"][0]

    # Independent account: each Gaussian's EWA footprint (perspective Jacobian at its mean, 0.3 px
    # dilation), alphas clamped and cut at 1/255, composited in depth order over the background.
    ref_fg, ref_op, (u, v) = splat_reference(cam)
    ref = ref_fg + (1 - ref_op) * torch.tensor(BG, dtype=torch.float64)
    # The renderer also stops at 3 sigma and at transmittance 1e-4: differences stay below ~1/100.
    assert (rgb.double() - ref).abs().max() < 0.012
    assert (op.double() - ref_op).abs().max() < 0.012
    # The pixel holding the front (red, opacity 0.9) Gaussian's centre: alpha 0.9 from it alone.
    k = 0
    pi, pj = int(v[k]), int(u[k])
    assert float(op[pi, pj, 0]) > 0.85 and rgb[pi, pj, 0] > 0.6 and rgb[pi, pj, 2] < 0.3
    check_golden("splat_gaussians", rgb, op, tmp_path)


def test_golden_comparison_rejects_a_changed_image(tmp_path):
    """The comparison itself has teeth: 2/255 off passes, 3/255 in one pixel fails, no file fails."""
    from PIL import Image

    rgb = torch.full((4, 4, 3), 0.4)
    op = torch.ones(4, 4, 1)
    Image.fromarray(to_rgba8(rgb, op), mode="RGBA").save(tmp_path / "probe.png")
    check_golden("probe", rgb + 2.0 / 255.0 * (torch.arange(3) == 0), op, tmp_path, directory=tmp_path, update=False)
    bumped = rgb.clone()
    bumped[1, 2, 1] += 3.0 / 255.0
    with pytest.raises(pytest.fail.Exception, match="1 pixel"):
        check_golden("probe", bumped, op, tmp_path, directory=tmp_path, update=False)
    assert (tmp_path / "probe-actual.png").exists()
    with pytest.raises(pytest.fail.Exception, match="no golden image"):
        check_golden("missing", rgb, op, tmp_path, directory=tmp_path, update=False)
