"""Torch rasterizer ops: coverage, perspective-correct barycentrics, depth test, gradients, fitting."""

from __future__ import annotations

import math

import pytest
import torch
import trimesh

from lift3d.backends import nvdiffrast_backend
from lift3d.utils.rasterize_ops import antialias, interpolate, rasterize, texture
from lift3d.utils.cameras import make_cameras



def _clip(mvp: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    vh = torch.cat([v, torch.ones_like(v[:, :1])], -1)
    return torch.einsum("bij,vj->bvi", mvp, vh)


def _pixel_ndc(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1


def test_single_triangle_layout_matches_nvdiffrast_convention():
    # Affine case (w = 1): barycentrics are the plain screen-space ones.
    pos = torch.tensor([[-0.6, -0.7, 0.2, 1.0], [0.8, -0.5, 0.2, 1.0], [0.1, 0.9, 0.2, 1.0]], dtype=torch.float64)
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast = rasterize(pos, tri, (16, 12))
    assert rast.shape == (1, 16, 12, 4)
    ys, xs = _pixel_ndc(16), _pixel_ndc(12)
    Y, X = torch.meshgrid(ys, xs, indexing="ij")
    a, b, c = pos[0, :2], pos[1, :2], pos[2, :2]

    def cross(p, q, r):  # twice the signed area of (p, q, r)
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    P = (X, Y)
    area = cross(a, b, c)
    l0 = cross(P, b, c) / area
    l1 = cross(a, P, c) / area
    l2 = 1 - l0 - l1
    inside = (l0 > 1e-9) & (l1 > 1e-9) & (l2 > 1e-9)
    cov = rast[0, ..., 3] > 0
    assert torch.equal(cov[inside], torch.ones_like(cov[inside]))
    strictly_out = (l0 < -1e-9) | (l1 < -1e-9) | (l2 < -1e-9)
    assert not cov[strictly_out].any()
    assert torch.allclose(rast[0, ..., 0][inside], l0[inside], atol=1e-9)
    assert torch.allclose(rast[0, ..., 1][inside], l1[inside], atol=1e-9)
    assert torch.allclose(rast[0, ..., 2][inside], torch.full_like(l0[inside], 0.2))
    assert torch.all(rast[0, ..., 3][cov] == 1.0)
    # Row 0 is NDC y = -1: the wide bottom edge (y ~ -0.6) is near the first rows.
    rows = cov.any(1).nonzero()
    assert rows.min() <= 2 and rows.max() >= 13


def test_perspective_correct_barycentrics_and_depth():
    cams = make_cameras(torch.tensor([20.0, -30.0]), torch.tensor([10.0, 200.0]), torch.tensor([2.0, 2.5]),
                        torch.tensor([45.0, 45.0]), 32, 40)
    m = trimesh.creation.icosphere(2, radius=0.7)
    v = torch.tensor(m.vertices, dtype=torch.float64)
    f = torch.tensor(m.faces)
    mvp = cams["mvp_mtx"].double()
    clip = _clip(mvp, v)
    rast = rasterize(clip, f, (32, 40))
    cov = rast[..., 3] > 0
    assert cov.float().mean() > 0.2
    # Interpolated world positions must reproject to the pixel centres (only true if perspective-correct).
    p = interpolate(v, rast, f)
    c = torch.einsum("bij,bhwj->bhwi", mvp, torch.cat([p, torch.ones_like(p[..., :1])], -1))
    ndc = c[..., :3] / c[..., 3:]
    X, Y = _pixel_ndc(40)[None, None, :], _pixel_ndc(32)[None, :, None]
    assert (ndc[..., 0] - X)[cov].abs().max() < 1e-9
    assert (ndc[..., 1] - Y)[cov].abs().max() < 1e-9
    assert (ndc[..., 2] - rast[..., 2])[cov].abs().max() < 1e-9
    # The visible point is the near side of the sphere: closer to the camera than the centre.
    cam = cams["camera_positions"].double()[:, None, None]
    dist = (p - cam).norm(dim=-1)
    for i in range(2):
        assert torch.all(dist[i][cov[i]] < cams["camera_distances"][i].item())
    assert torch.all(rast[..., 3][cov] >= 1) and torch.all(rast[..., 3][cov] <= f.shape[0])
    assert torch.all(rast[~cov] == 0)


def test_depth_test_keeps_nearest_triangle_regardless_of_order():
    big = [[-1.0, -1.0], [3.0, -1.0], [-1.0, 3.0]]
    verts = []
    for z in (0.5, -0.2, 0.9):
        verts += [[x, y, z, 1.0] for x, y in big]
    pos = torch.tensor(verts)
    tri = torch.arange(9).view(3, 3)
    rast = rasterize(pos, tri, (8, 8))
    assert torch.all(rast[..., 3] == 2)  # the z = -0.2 triangle, id 1 (+1)
    assert torch.allclose(rast[..., 2], torch.full((1, 8, 8), -0.2))
    rast2 = rasterize(pos, tri.flip(0), (8, 8))
    assert torch.all(rast2[..., 3] == 2)  # flipped order: now index 1 again (middle stays middle)
    rast3 = rasterize(pos, tri[[1, 0, 2]], (8, 8))
    assert torch.all(rast3[..., 3] == 1)


def test_batch_and_chunking_agree(monkeypatch):
    import lift3d.utils.rasterize_ops as ops

    cams = make_cameras(torch.tensor([10.0, 40.0, -20.0]), torch.tensor([0.0, 120.0, 240.0]),
                        torch.full((3,), 2.2), torch.full((3,), 40.0), 24, 24)
    m = trimesh.creation.icosphere(2, radius=0.6)
    v, f = torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.int32)
    clip = _clip(cams["mvp_mtx"], v)
    full = rasterize(clip, f, (24, 24))
    monkeypatch.setattr(ops, "_PAIR_CHUNK", 37)  # many tiny chunks
    chunked = rasterize(clip, f, (24, 24))
    assert torch.equal(full, chunked)
    single = rasterize(clip[1], f, (24, 24))
    assert torch.equal(single[0], full[1])


def test_triangles_behind_camera_and_empty_inputs():
    pos = torch.tensor([[-1.0, -1.0, 0.0, -1.0], [1.0, -1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    tri = torch.tensor([[0, 1, 2]])
    assert torch.all(rasterize(pos, tri, (4, 4)) == 0)
    empty = rasterize(pos, torch.zeros(0, 3, dtype=torch.long), (4, 4))
    assert empty.shape == (1, 4, 4, 4) and torch.all(empty == 0)
    with pytest.raises(TypeError, match="int32 or int64"):
        rasterize(pos, tri.float(), (4, 4))


def _small_scene(dtype=torch.float64):
    # Two triangles at different depths and a perspective w, overlapping partly.
    pos = torch.tensor(
        [[-0.7, -0.6, 0.1, 1.1], [0.6, -0.5, 0.2, 0.9], [-0.1, 0.7, 0.1, 1.0],
         [0.0, -0.2, 0.5, 1.0], [0.9, 0.1, 0.4, 1.2], [0.2, 0.8, 0.5, 1.0]], dtype=dtype)
    tri = torch.tensor([[0, 1, 2], [3, 4, 5]])
    return pos, tri


def test_interpolate_gradcheck_attr_and_positions():
    pos, tri = _small_scene()
    attr = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    pos = pos.requires_grad_(True)

    def fn(a, p):
        return interpolate(a, rasterize(p, tri, (6, 7)), tri)

    assert torch.autograd.gradcheck(fn, (attr, pos), eps=1e-6, atol=1e-6)
    # Gradient to positions flows through rast's u, v (nonzero for a non-constant attribute).
    fn(attr, pos).square().sum().backward()
    assert pos.grad.abs().sum() > 0


def test_antialias_gradcheck_color_and_positions():
    pos, tri = _small_scene()
    torch.manual_seed(0)
    rast = rasterize(pos, tri, (8, 9))
    color = torch.rand(1, 8, 9, 3, dtype=torch.float64, requires_grad=True)
    pos = pos.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c, p: antialias(c, rast, p, tri), (color, pos), eps=1e-6, atol=1e-6)


def test_antialiased_coverage_tracks_subpixel_motion():
    # A square's right edge moves by a fraction of a pixel: hard coverage stays put, the
    # antialiased coverage moves by (shift in pixels) x (edge height in pixels), with matching gradient.
    H = W = 16
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]])

    def coverage(shift: torch.Tensor) -> torch.Tensor:
        base = torch.tensor([[-0.45, -0.45, 0.0, 1.0], [0.4, -0.45, 0.0, 1.0],
                             [0.4, 0.45, 0.0, 1.0], [-0.45, 0.45, 0.0, 1.0]], dtype=torch.float64)
        move = torch.zeros(4, 4, dtype=torch.float64)
        move[1:3, 0] = 1.0  # the two right-hand corners
        pos = base + move * shift
        rast = rasterize(pos, tri, (H, W))
        mask = (rast[..., 3:] > 0).double()
        return antialias(mask, rast, pos, tri).sum(), mask.sum()

    s = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    aa0, hard0 = coverage(s)
    (g,) = torch.autograd.grad(aa0, s)
    aa1, hard1 = coverage(torch.tensor(0.03, dtype=torch.float64))
    assert hard0 == hard1  # the shift crosses no pixel centre
    rows = 0.9 * H / 2  # the edge spans 0.9 NDC units = 7.2 pixels
    expect = 0.03 * W / 2 * rows
    assert (aa1 - aa0).item() == pytest.approx(expect, rel=0.2)
    assert g.item() == pytest.approx(W / 2 * rows, rel=0.2)
    # Area in pixels of the square, versus antialiased sum: closer than the hard mask.
    true_area = (0.85 * W / 2) * (0.9 * H / 2)
    assert abs(aa0.item() - true_area) <= abs(hard0.item() - true_area) + 1e-9


@pytest.mark.parametrize("subdiv", [1, 4])
def test_antialias_coverage_gradient_with_subpixel_triangles(subdiv):
    # A sphere's antialiased coverage and its derivative w.r.t. the sphere's scale match the
    # projected disc, also when triangles are far smaller than a pixel (icosphere(4) at 32 px): the
    # silhouette edge is then found by walking across the triangles between two pixel centres.
    cams = make_cameras(torch.tensor([-20.0]), torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([40.0]), 32, 32)
    m = trimesh.creation.icosphere(subdiv, radius=0.5)
    v, f = torch.tensor(m.vertices, dtype=torch.float64), torch.tensor(m.faces)
    s = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    clip = _clip(cams["mvp_mtx"].double(), v * s)
    rast = rasterize(clip, f, (32, 32))
    cov = antialias((rast[..., 3:] > 0).double(), rast, clip, f).sum()
    (g,) = torch.autograd.grad(cov, s)

    def disc_area(scale):  # pixels; angular radius asin(r / d)
        rad = math.tan(math.asin(0.5 * scale / 2.0)) / math.tan(math.radians(20)) * 16
        return math.pi * rad**2

    d_area = (disc_area(1.001) - disc_area(0.999)) / 0.002
    if subdiv == 4:  # a fine mesh is (almost) the sphere
        assert cov.item() == pytest.approx(disc_area(1.0), rel=0.02)
    assert g.item() == pytest.approx(d_area, rel=0.1)


def test_antialias_leaves_interior_edges_alone():
    # Two coplanar triangles sharing a diagonal: the diagonal is no silhouette, colours stay sharp.
    pos = torch.tensor([[-0.8, -0.8, 0, 1], [0.8, -0.8, 0, 1], [0.8, 0.8, 0, 1], [-0.8, 0.8, 0, 1.0]])
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rast = rasterize(pos, tri, (10, 10))
    color = torch.where(rast[..., 3:] == 1, torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0]))
    color = torch.where(rast[..., 3:] > 0, color, torch.zeros(3))
    out = antialias(color, rast, pos, tri)
    inner = (rast[..., 3] > 0)
    inner[:, 1, :] = False  # border rows/cols next to the outer silhouette may blend with background
    inner[:, -2, :] = False
    inner[:, :, 1] = False
    inner[:, :, -2] = False
    assert torch.allclose(out[inner], color[inner])


def test_texture_nearest_linear_and_wrap():
    tex = torch.arange(12, dtype=torch.float64).view(1, 3, 4, 1)  # rows of 4 texels
    # Texel centres: u = (k + 0.5) / 4, v = (r + 0.5) / 3.
    uv = torch.tensor([[[[0.125, 0.5 / 3], [0.375, 1.5 / 3], [0.25, 0.5 / 3]]]], dtype=torch.float64)
    near = texture(tex, uv, filter_mode="nearest")
    assert near[0, 0, :2, 0].tolist() == [0.0, 5.0]
    lin = texture(tex, uv, filter_mode="linear")
    assert lin[0, 0, 2, 0].item() == pytest.approx(0.5)
    # Wrap: u = 0 sits between the last and the first texel of a row.
    uvw = torch.tensor([[[[0.0, 0.5 / 3], [1.125, 0.5 / 3]]]], dtype=torch.float64)
    wrap = texture(tex, uvw, boundary_mode="wrap")
    assert wrap[0, 0, 0, 0].item() == pytest.approx(1.5)  # (3 + 0) / 2
    assert wrap[0, 0, 1, 0].item() == pytest.approx(0.0)
    clamp = texture(tex, uvw, boundary_mode="clamp")
    assert clamp[0, 0, 0, 0].item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="filter_mode"):
        texture(tex, uv, filter_mode="linear-mipmap-linear")
    t = tex.clone().requires_grad_(True)
    texture(t, uv).sum().backward()
    assert t.grad.sum().item() == pytest.approx(3.0)


def test_silhouette_fitting_raises_iou():
    """Fit an icosphere's vertices to an ellipsoid's silhouettes from 6 views (antialias gradients only)."""
    torch.manual_seed(0)
    el = torch.tensor([0.0, 0.0, 0.0, 0.0, 60.0, -60.0])
    az = torch.tensor([0.0, 90.0, 180.0, 270.0, 45.0, 225.0])
    cams = make_cameras(el, az, torch.full((6,), 2.5), torch.full((6,), 40.0), 64, 64)

    def silhouette(v, f):
        clip = _clip(cams["mvp_mtx"], v)
        rast = rasterize(clip, f, (64, 64))
        mask = (rast[..., 3:] > 0).float()
        return antialias(mask, rast, clip, f), mask

    tm = trimesh.creation.icosphere(3)
    tv = torch.tensor(tm.vertices, dtype=torch.float32) * torch.tensor([0.8, 0.55, 0.45])
    with torch.no_grad():
        _, target = silhouette(tv, torch.tensor(tm.faces))
    sm = trimesh.creation.icosphere(2, radius=0.3)
    v0 = torch.tensor(sm.vertices, dtype=torch.float32)
    f = torch.tensor(sm.faces)
    E = torch.tensor(sm.edges_unique)
    deg = torch.zeros(len(v0)).index_add(0, E.reshape(-1), torch.ones(E.numel()))

    def laplacian(v):
        s = torch.zeros_like(v).index_add(0, E[:, 0], v[E[:, 1]]).index_add(0, E[:, 1], v[E[:, 0]])
        return (v - s / deg[:, None]).square().sum(-1).mean()

    def iou(m):
        a, b = m > 0.5, target > 0.5
        return ((a & b).sum() / (a | b).sum()).item()

    off = torch.zeros_like(v0, requires_grad=True)
    # Without antialias the hard mask carries no gradient to the vertices at all.
    clip = _clip(cams["mvp_mtx"], v0 + off)
    hard = (rasterize(clip, f, (64, 64))[..., 3:] > 0).float()
    assert not hard.requires_grad
    opt = torch.optim.Adam([off], lr=0.01)
    with torch.no_grad():
        iou0 = iou(silhouette(v0, f)[1])
    for _ in range(80):
        v = v0 + off
        aa, _ = silhouette(v, f)
        loss = (aa - target).square().mean() + laplacian(v)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        iou1 = iou(silhouette(v0 + off, f)[1])
    assert iou0 < 0.5
    assert iou1 > 0.9, f"IoU {iou0:.3f} -> {iou1:.3f}"


@pytest.mark.skipif(torch.cuda.is_available() and nvdiffrast_backend.available(), reason="nvdiffrast is usable here")
def test_backend_selection_without_nvdiffrast():
    pos, tri = _small_scene(torch.float32)
    auto = rasterize(pos, tri, (4, 4))  # falls back to torch silently
    assert torch.equal(auto, rasterize(pos, tri, (4, 4), backend="torch"))
    with pytest.raises(RuntimeError, match="nvdiffrast"):
        rasterize(pos, tri, (4, 4), backend="nvdiffrast")
    with pytest.raises(ValueError, match="backend"):
        rasterize(pos, tri, (4, 4), backend="opengl")


_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not nvdiffrast_backend.available(),
                           reason="needs CUDA and nvdiffrast")


@_cuda
def test_nvdiffrast_parity_forward_backward():
    cams = make_cameras(torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([2.2]), torch.tensor([40.0]), 64, 64)
    m = trimesh.creation.icosphere(3, radius=0.6)
    v = torch.tensor(m.vertices, dtype=torch.float32, device="cuda")
    f = torch.tensor(m.faces, dtype=torch.int32, device="cuda")
    attr = torch.rand(len(v), 3, device="cuda")
    out = {}
    for be in ("torch", "nvdiffrast"):
        p = _clip(cams["mvp_mtx"].cuda(), v).detach().requires_grad_(True)
        a = attr.clone().requires_grad_(True)
        rast = rasterize(p, f, (64, 64), backend=be)
        col = antialias(interpolate(a, rast, f, backend=be), rast, p, f, backend=be)
        g = torch.randn_like(col, generator=torch.Generator("cuda").manual_seed(0))
        (col * g).sum().backward()
        out[be] = (rast, col, a.grad, p.grad)
    rt, rn = out["torch"][0], out["nvdiffrast"][0]
    same = rt[..., 3] == rn[..., 3]
    assert same.float().mean() > 0.99
    assert torch.allclose(rt[same], rn[same], atol=1e-4)
    assert torch.allclose(out["torch"][1], out["nvdiffrast"][1], atol=0.05)
    assert torch.allclose(out["torch"][2], out["nvdiffrast"][2], atol=0.05, rtol=0.05)
    cos = torch.nn.functional.cosine_similarity(out["torch"][3].flatten(), out["nvdiffrast"][3].flatten(), dim=0)
    assert cos > 0.8


@_cuda
def test_nvdiffrast_parity_texture():
    tex = torch.rand(1, 8, 8, 3, device="cuda")
    uv = torch.rand(1, 5, 5, 2, device="cuda") * 1.5 - 0.25
    for mode in ("clamp", "wrap"):
        a = texture(tex, uv, boundary_mode=mode, backend="torch")
        b = texture(tex, uv, boundary_mode=mode, backend="nvdiffrast")
        assert torch.allclose(a, b, atol=1e-4)
