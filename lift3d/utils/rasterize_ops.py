"""Differentiable triangle rasterization with an nvdiffrast-shaped API, in plain PyTorch.

Implements the primitive set of "Modular Primitives for High-Performance Differentiable Rendering"
(Laine et al., SIGGRAPH Asia 2020): ``rasterize`` -> ``interpolate`` -> ``texture`` -> ``antialias``.
Outputs follow nvdiffrast's layout so either path can feed the same code:

* ``rast`` [B, H, W, 4] = (u, v, z/w, triangle_id + 1), 0 in the last channel meaning empty. (u, v)
  are perspective-correct barycentrics of the triangle's first and second vertex (the third gets
  1 - u - v), z/w is the NDC depth.
* pixel (row i, column j) samples NDC ``x = 2 (j + 0.5) / W - 1``, ``y = 2 (i + 0.5) / H - 1`` (row 0
  is NDC y = -1; with lift3d's ``mvp_mtx`` clip y grows down the image, so rows match the rays).

Differences from nvdiffrast: ``rasterize`` and ``interpolate`` return one tensor (no image-space
derivatives); triangles with a vertex at or behind the camera plane (w <= 0) are dropped instead of
clipped; ``texture`` has no mipmaps. The CUDA path (``lift3d.backends.nvdiffrast_backend``) is
used when nvdiffrast imports and the tensors are on CUDA, unless ``backend="torch"`` is passed.

How the torch rasterizer stays fast on a CPU: every triangle expands to the pixels of its screen
bounding box (``repeat_interleave``, in chunks of bounded size), an inside test and the depth are
evaluated for all (triangle, pixel) pairs at once, and the depth test is one ``scatter_reduce``
``amin`` over int64 keys that pack (quantised depth, triangle id). Only that visibility decision is
not differentiable: barycentrics and depth of each pixel's winner are then recomputed from
``pos`` with autograd, so gradients flow from ``rast`` (and ``interpolate``) to vertex positions.
``antialias`` then moves colour across silhouette edges by the edge's sub-pixel position, which
carries gradients of coverage to the vertices, as nvdiffrast's analytic antialiasing does.

These are primitives, not a renderer: the mesh renderer, UV baking (:mod:`lift3d.utils.uv`), the
fixed-mesh geometry's texture lookup and the export fidelity check all draw with them, so they sit
in ``utils``, below geometry, renderers and exporters alike.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Integer
from torch import Tensor

from lift3d.backends import nvdiffrast_backend as _nvdr

Backend = Literal["auto", "torch", "nvdiffrast"]

# (triangle, pixel) pairs evaluated at once; bounds peak memory to roughly 100 bytes per pair.
_PAIR_CHUNK = 1 << 21
_INT64_MAX = torch.iinfo(torch.int64).max
# Triangles crossed at most between two pixel centres when looking for the silhouette edge.
_AA_MAX_WALK = 16


def _use_cuda(backend: str, *tensors: Tensor) -> bool:
    if backend not in ("auto", "torch", "nvdiffrast"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'nvdiffrast', got {backend!r}")
    if backend == "torch":
        return False
    ok = _nvdr.available() and all(t.is_cuda for t in tensors)
    if backend == "nvdiffrast" and not ok:
        raise RuntimeError(
            "backend='nvdiffrast' needs the nvdiffrast package and CUDA tensors; "
            f"nvdiffrast importable: {_nvdr.available()}, devices: {sorted({str(t.device) for t in tensors})}"
        )
    return ok


def _batched_pos(pos: Tensor) -> Tensor:
    if pos.ndim == 2:
        pos = pos[None]
    if pos.ndim != 3 or pos.shape[-1] != 4:
        raise ValueError(f"pos must be clip-space positions [B, V, 4] or [V, 4], got {tuple(pos.shape)}")
    return pos


def _check_tri(tri: Tensor, n_vertices: int) -> Tensor:
    if tri.ndim != 2 or tri.shape[-1] != 3:
        raise ValueError(f"tri must be [F, 3] vertex indices, got {tuple(tri.shape)}")
    if tri.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tri must be int32 or int64, got {tri.dtype}")
    return tri.long()


def _homogeneous_barycentrics(v: Tensor, X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Unnormalised perspective-correct barycentrics of NDC points (X, Y) in clip-space triangles.

    ``v`` [N, 3, 4] clip-space vertices, X, Y [N]. Returns c0, c1, c2 (each [N]) with
    b_i = c_i / (c0 + c1 + c2), plus numerator and denominator of the NDC depth.
    Solving sum_i b_i (x_i - X w_i) = sum_i b_i (y_i - Y w_i) = 0 is a 2D cross product of the
    "reprojection residual" vectors, which needs no division by w (so no precision loss near w=0).
    """
    ax = v[..., 0] - X[:, None] * v[..., 3]  # [N, 3]
    ay = v[..., 1] - Y[:, None] * v[..., 3]  # [N, 3]
    c0 = ax[:, 1] * ay[:, 2] - ay[:, 1] * ax[:, 2]
    c1 = ax[:, 2] * ay[:, 0] - ay[:, 2] * ax[:, 0]
    c2 = ax[:, 0] * ay[:, 1] - ay[:, 0] * ax[:, 1]
    z_num = c0 * v[:, 0, 2] + c1 * v[:, 1, 2] + c2 * v[:, 2, 2]
    w_den = c0 * v[:, 0, 3] + c1 * v[:, 1, 3] + c2 * v[:, 2, 3]
    return c0, c1, c2, z_num, w_den


def _linear_coefficients(v: Tensor) -> Tensor:
    """[T, 3, 4] clip triangles -> [T, 5, 3]: c0, c1, c2, z_num, w_den as A + B X + C Y.

    The X*Y terms of the cross products cancel, so every quantity of
    :func:`_homogeneous_barycentrics` is affine in the pixel's NDC position; storing 15 numbers
    per triangle makes the per-pair work a gather and a few multiply-adds.
    """
    x, y, z, w = v.unbind(-1)  # each [T, 3]
    coef = []
    for i in range(3):
        j, k = (i + 1) % 3, (i + 2) % 3
        a = x[:, j] * y[:, k] - y[:, j] * x[:, k]
        b = -(w[:, j] * y[:, k] - y[:, j] * w[:, k])
        c = -(x[:, j] * w[:, k] - w[:, j] * x[:, k])
        coef.append(torch.stack([a, b, c], -1))
    cs = torch.stack(coef, 1)  # [T, 3(i), 3(abc)]
    z_num = (cs * z[:, :, None]).sum(1)
    w_den = (cs * w[:, :, None]).sum(1)
    return torch.cat([cs, z_num[:, None], w_den[:, None]], 1)  # [T, 5, 3]


@torch.no_grad()
def _visible_triangle(pos: Tensor, tri: Tensor, H: int, W: int) -> Tensor:
    """Z-buffer: [B*H*W] int64, winning triangle index per pixel or -1."""
    B, _, _ = pos.shape
    n_tri = tri.shape[0]
    dev = pos.device
    v = pos[:, tri].double() if pos.dtype == torch.float64 else pos[:, tri].float()  # [B, F, 3, 4]
    v = v.reshape(B * n_tri, 3, 4)
    w = v[..., 3]
    front = (w > 1e-8).all(-1)  # dropped, not clipped: see module docstring
    inv_w = 1.0 / torch.where(front[:, None], w, torch.ones_like(w))
    sx = (v[..., 0] * inv_w + 1.0) * (0.5 * W) - 0.5  # pixel-centre units: centre of column j is j
    sy = (v[..., 1] * inv_w + 1.0) * (0.5 * H) - 0.5
    x0 = torch.ceil(sx.amin(-1)).clamp(min=0)
    x1 = torch.floor(sx.amax(-1)).clamp(max=W - 1)
    y0 = torch.ceil(sy.amin(-1)).clamp(min=0)
    y1 = torch.floor(sy.amax(-1)).clamp(max=H - 1)
    keep = front & (x1 >= x0) & (y1 >= y0) & torch.isfinite(sx).all(-1) & torch.isfinite(sy).all(-1)
    ids = keep.nonzero().squeeze(1)  # flat b * F + f
    zbuf = torch.full((B * H * W,), _INT64_MAX, dtype=torch.int64, device=dev)
    if ids.numel() == 0:
        return torch.full_like(zbuf, -1)
    x0, y0 = x0[ids].long(), y0[ids].long()
    bw = x1[ids].long() - x0 + 1
    counts = bw * (y1[ids].long() - y0 + 1)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    tri_int = torch.stack([x0, y0, bw, starts], 1)  # [T, 4]: one gather per pair instead of four
    coef = _linear_coefficients(v[ids])  # [T, 5, 3]
    # Contiguous [T, k] tables of the constant, X and Y coefficients: barycentrics (3) and depth (2).
    cA, cB, cC = (coef[:, :3, j].contiguous() for j in range(3))
    zA, zB, zC = (coef[:, 3:, j].contiguous() for j in range(3))
    # Depth quantised to leave room for the triangle id in the low digits: ties go to the lower id.
    q_scale = float((1 << 62) // (n_tri + 1))
    n_ids = ids.numel()
    lo = 0
    while lo < n_ids:
        # Whole triangles per chunk, about _PAIR_CHUNK pairs each (one huge triangle goes alone).
        budget = starts[lo] + _PAIR_CHUNK
        hi = max(int(torch.searchsorted(ends, budget, right=True)), lo + 1)
        cnt = counts[lo:hi]
        local = torch.repeat_interleave(torch.arange(lo, hi, device=dev), cnt)  # [P]
        ti = tri_int.index_select(0, local)  # [P, 4]
        k = torch.arange(int(cnt.sum()), device=dev) + (starts[lo] - ti[:, 3])
        row = torch.div(k, ti[:, 2], rounding_mode="floor")
        px = ti[:, 0] + (k - row * ti[:, 2])
        py = ti[:, 1] + row
        X = ((2.0 / W) * px.to(v.dtype) + (1.0 / W - 1.0))[:, None]
        Y = ((2.0 / H) * py.to(v.dtype) + (1.0 / H - 1.0))[:, None]
        c = torch.addcmul(torch.addcmul(cA.index_select(0, local), cB.index_select(0, local), X),
                          cC.index_select(0, local), Y)  # [P, 3]
        s = c.sum(-1, keepdim=True)
        inside = ((c * s) >= 0).all(-1) & (s[:, 0] != 0)
        sel = inside.nonzero().squeeze(1)
        if sel.numel():
            li = local[sel]
            Xs, Ys = X[sel], Y[sel]
            zw = torch.addcmul(torch.addcmul(zA.index_select(0, li), zB.index_select(0, li), Xs),
                               zC.index_select(0, li), Ys)  # [S, 2]
            depth = zw[:, 0] / zw[:, 1]
            dz = (depth >= -1) & (depth <= 1)
            flat = ids[li[dz]]  # b * F + f
            b = torch.div(flat, n_tri, rounding_mode="floor")
            f = flat - b * n_tri
            pix = b * (H * W) + py[sel][dz] * W + px[sel][dz]
            q = ((depth[dz].double() + 1.0) * (0.5 * q_scale)).long().clamp(0, int(q_scale) - 1)
            zbuf.scatter_reduce_(0, pix, q * (n_tri + 1) + f, reduce="amin")
        lo = hi
    return torch.where(zbuf == _INT64_MAX, torch.full_like(zbuf, -1), zbuf % (n_tri + 1))


def rasterize(
    pos: Float[Tensor, "*B V 4"],
    tri: Integer[Tensor, "F 3"],
    resolution: tuple[int, int],
    backend: Backend = "auto",
) -> Float[Tensor, "B H W 4"]:
    """Rasterize clip-space triangles into ``[B, H, W, 4]`` = (u, v, z/w, triangle_id + 1).

    Args:
        pos: clip-space vertex positions [B, V, 4] (or [V, 4], rendered as B = 1).
        tri: [F, 3] int32/int64 vertex indices, shared by the batch.
        resolution: (H, W).
        backend: "auto" (nvdiffrast when importable and on CUDA), "torch" or "nvdiffrast".

    u, v and z/w are differentiable w.r.t. ``pos``; the last channel (which triangle is visible)
    is not, like nvdiffrast.
    """
    H, W = int(resolution[0]), int(resolution[1])
    pos = _batched_pos(pos)
    tri = _check_tri(tri, pos.shape[1])
    if _use_cuda(backend, pos, tri):
        return _nvdr.rasterize(pos, tri, (H, W))
    B, V, _ = pos.shape
    out = torch.zeros(B * H * W, 4, dtype=pos.dtype, device=pos.device)
    if tri.shape[0] == 0:
        return out.view(B, H, W, 4)
    winner = _visible_triangle(pos, tri, H, W)  # [B*H*W]
    pix = (winner >= 0).nonzero().squeeze(1)  # [N]
    if pix.numel() == 0:
        return out.view(B, H, W, 4)
    f = winner[pix]
    b = torch.div(pix, H * W, rounding_mode="floor")
    rem = pix - b * (H * W)
    py = torch.div(rem, W, rounding_mode="floor")
    px = rem - py * W
    X = (2.0 * px.to(pos.dtype) + 1.0) / W - 1.0
    Y = (2.0 * py.to(pos.dtype) + 1.0) / H - 1.0
    vtx = pos[b[:, None], tri[f]]  # [N, 3, 4], differentiable
    c0, c1, c2, z_num, w_den = _homogeneous_barycentrics(vtx, X, Y)
    s = c0 + c1 + c2
    vals = torch.stack([c0 / s, c1 / s, z_num / w_den, (f + 1).to(pos.dtype)], -1)  # [N, 4]
    out = out.index_copy(0, pix, vals)
    return out.view(B, H, W, 4)


def interpolate(
    attr: Float[Tensor, "*B V C"],
    rast: Float[Tensor, "B H W 4"],
    tri: Integer[Tensor, "F 3"],
    backend: Backend = "auto",
) -> Float[Tensor, "B H W C"]:
    """Per-pixel attributes ``u a0 + v a1 + (1 - u - v) a2`` of the visible triangle; 0 where empty.

    ``attr`` is [B, V, C] (per batch item) or [V, C] (shared). Differentiable w.r.t. ``attr`` and,
    through rast's u, v, w.r.t. the positions that produced ``rast``.
    """
    if attr.ndim not in (2, 3):
        raise ValueError(f"attr must be [B, V, C] or [V, C], got {tuple(attr.shape)}")
    if rast.ndim != 4 or rast.shape[-1] != 4:
        raise ValueError(f"rast must be [B, H, W, 4], got {tuple(rast.shape)}")
    tri = _check_tri(tri, attr.shape[-2])
    if _use_cuda(backend, attr, rast, tri):
        return _nvdr.interpolate(attr.contiguous(), rast.contiguous(), tri)
    B, H, W, _ = rast.shape
    V, C = attr.shape[-2], attr.shape[-1]
    if attr.ndim == 3 and attr.shape[0] not in (1, B):
        raise ValueError(f"attr batch {attr.shape[0]} does not match rast batch {B}")
    flat_rast = rast.reshape(-1, 4)
    tid = flat_rast[:, 3].detach().long() - 1
    pix = (tid >= 0).nonzero().squeeze(1)
    dtype = torch.promote_types(attr.dtype, rast.dtype)
    out = torch.zeros(B * H * W, C, dtype=dtype, device=rast.device)
    if pix.numel() == 0:
        return out.view(B, H, W, C)
    vi = tri[tid[pix]]  # [N, 3]
    if attr.ndim == 3 and attr.shape[0] == B and B > 1:
        b = torch.div(pix, H * W, rounding_mode="floor")
        a = attr.reshape(B * V, C)[vi + (b * V)[:, None]]  # [N, 3, C]
    else:
        a = attr.reshape(-1, V, C)[0][vi]  # [N, 3, C]
    uv = flat_rast[pix, :2]
    bary = torch.cat([uv, 1.0 - uv.sum(-1, keepdim=True)], -1).to(dtype)  # [N, 3]
    vals = (bary[:, :, None] * a.to(dtype)).sum(1)
    return out.index_copy(0, pix, vals).view(B, H, W, C)


_TOPOLOGY_CACHE: dict[str, tuple] = {}


def _edge_topology(pos: Tensor, tri: Tensor) -> tuple[Tensor, Tensor]:
    """Silhouette flags [B, F, 3] and neighbours [F, 3] for edge k (vertex k -> k+1) of each triangle.

    An edge is a silhouette when it bounds one triangle only, more than two (non-manifold), or two
    triangles facing opposite ways on screen. Edges between two triangles that face the same way
    are interior to the visible surface and must not be antialiased (nvdiffrast's topology test).
    The neighbour is the other triangle across the edge (-1 on boundary / non-manifold edges).
    """
    n_tri = tri.shape[0]
    V = pos.shape[1]
    cached = _TOPOLOGY_CACHE.get("entry")
    # Identity (not address) of the index tensor: the cache holds a reference, so a new tensor
    # can never alias a freed one. Fixed meshes hit; DMTet makes new faces each step and misses.
    if cached is not None and cached[0] is tri and cached[1] == (tri._version, V):
        fa, fb, inv, manifold, neighbour = cached[2]
    else:
        e = torch.stack([tri, tri.roll(-1, dims=1)], -1).reshape(-1, 2)  # [3F, 2]
        key = e.amin(-1) * V + e.amax(-1)
        _, inv, counts = torch.unique(key, return_inverse=True, return_counts=True)
        order = torch.argsort(inv, stable=True)
        first = torch.zeros_like(counts)
        first[1:] = torch.cumsum(counts, 0)[:-1]
        face_of = torch.arange(3 * n_tri, device=tri.device) // 3
        fa = face_of[order[first]]  # [E] first face of each unique edge
        fb = face_of[order[(first + 1).clamp(max=3 * n_tri - 1)]]
        manifold = counts == 2
        other = torch.where(fa[inv] == face_of, fb[inv], fa[inv])
        neighbour = torch.where(manifold[inv], other, torch.full_like(other, -1)).view(n_tri, 3)
        _TOPOLOGY_CACHE["entry"] = (tri, (tri._version, V), (fa, fb, inv, manifold, neighbour))
    v = pos[:, tri]  # [B, F, 3, 4]
    # Orientation on screen: sign of the 2D cross product in homogeneous form (valid for w > 0).
    x, y, w = v[..., 0], v[..., 1], v[..., 3]  # [B, F, 3]
    area = (x * (y.roll(-1, -1) * w.roll(-2, -1) - w.roll(-1, -1) * y.roll(-2, -1))).sum(-1)  # det [x y w]
    facing = area > 0
    sil_e = ~manifold[None] | (facing[:, fa] != facing[:, fb])  # [B, E]
    return sil_e[:, inv].view(-1, n_tri, 3), neighbour


def _edge_functions(sx: Tensor, sy: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Edge functions [P, 3] of screen triangles (sx, sy [P, 3]) at points (px, py [P])."""
    ex, ey = sx.roll(-1, dims=1) - sx, sy.roll(-1, dims=1) - sy
    return ex * (py[:, None] - sy) - ey * (px[:, None] - sx)


def antialias(
    color: Float[Tensor, "B H W C"],
    rast: Float[Tensor, "B H W 4"],
    pos: Float[Tensor, "*B V 4"],
    tri: Integer[Tensor, "F 3"],
    backend: Backend = "auto",
) -> Float[Tensor, "B H W C"]:
    """Blend colours across silhouette edges by where the edge crosses between pixel centres.

    For each pair of neighbouring pixels showing different triangles, the silhouette edge of the
    surface seen at the nearer pixel that crosses the segment between the two centres at fraction
    t moves ``|t - 1/2|`` of one pixel's colour into the other. t depends on the vertex positions,
    so coverage (e.g. an opacity mask) gets gradients w.r.t. ``pos``. The edge is found by walking
    from the nearer pixel's triangle across interior edges along the segment (up to
    ``_AA_MAX_WALK`` triangles), so meshes with triangles smaller than a pixel still get silhouette
    gradients. Edges are handled by the pixel pairs across their minor axis only (horizontal pairs
    for steep edges), so no pixel is corrected twice for one edge. Silhouette = boundary or
    non-manifold edge, or an edge between a front- and a back-facing triangle (vertices are
    matched by index, so a mesh must share vertices between its faces).
    """
    if color.ndim != 4 or rast.shape[:3] != color.shape[:3]:
        raise ValueError(
            f"color [B, H, W, C] must match rast [B, H, W, 4]: {tuple(color.shape)} vs {tuple(rast.shape)}"
        )
    pos = _batched_pos(pos)
    tri = _check_tri(tri, pos.shape[1])
    B, H, W, C = color.shape
    if pos.shape[0] == 1 and B > 1:
        pos = pos.expand(B, -1, -1)
    if _use_cuda(backend, color, rast, pos, tri):
        return _nvdr.antialias(color.contiguous(), rast.contiguous(), pos.contiguous(), tri)
    if tri.shape[0] == 0:
        return color
    tid = rast[..., 3].detach().long()  # [B, H, W], 0 empty
    depth = rast[..., 2].detach()
    lin = torch.arange(B * H * W, device=color.device).view(B, H, W)
    p_idx, q_idx, horiz = [], [], []
    for dim, is_h in ((2, True), (1, False)):
        n = tid.shape[dim]
        a = tid.narrow(dim, 0, n - 1)
        b = tid.narrow(dim, 1, n - 1)
        m = a != b
        p_idx.append(lin.narrow(dim, 0, n - 1)[m])
        q_idx.append(lin.narrow(dim, 1, n - 1)[m])
        horiz.append(torch.full((int(m.sum()),), is_h, device=color.device))
    p, q, hz = torch.cat(p_idx), torch.cat(q_idx), torch.cat(horiz)
    if p.numel() == 0:
        return color
    tflat, dflat = tid.reshape(-1), depth.reshape(-1)
    tp, tq = tflat[p], tflat[q]
    p_front = (tq == 0) | ((tp != 0) & (dflat[p] <= dflat[q]))
    fpix = torch.where(p_front, p, q)  # pixel showing the occluding triangle
    opix = torch.where(p_front, q, p)
    f = tflat[fpix] - 1  # [P]
    b = torch.div(fpix, H * W, rounding_mode="floor")

    def centre(pix: Tensor) -> tuple[Tensor, Tensor]:
        rem = pix - b * (H * W)
        r = torch.div(rem, W, rounding_mode="floor")
        return (rem - r * W).to(pos.dtype), r.to(pos.dtype)

    fx, fy = centre(fpix)
    ox, oy = centre(opix)
    with torch.no_grad():
        pd = pos.detach()
        w_all = pd[..., 3]
        okw = w_all > 1e-8
        w_safe = torch.where(okw, w_all, torch.ones_like(w_all))
        sx_all = (pd[..., 0] / w_safe + 1.0) * (0.5 * W) - 0.5  # [B, V] pixel-centre units
        sy_all = (pd[..., 1] / w_safe + 1.0) * (0.5 * H) - 0.5
        sil, neighbour = _edge_topology(pd, tri)
        n_tri = tri.shape[0]
        # Per (view, face) tables, gathered with one index_select per step.
        fsx = sx_all[:, tri].reshape(-1, 3)  # [B*F, 3]
        fsy = sy_all[:, tri].reshape(-1, 3)
        fok = okw[:, tri].all(-1).reshape(-1)  # [B*F]
        sil_flat = sil.reshape(-1)  # [B*F*3]
        nb_flat = neighbour.reshape(-1)  # [F*3]
        # Walk from the front pixel's triangle along the segment to the other pixel's centre,
        # crossing interior edges, until a silhouette edge is crossed. With triangles smaller than
        # a pixel the silhouette usually belongs to a neighbour of the triangle seen at the pixel.
        P = f.shape[0]
        cur = f.clone()
        found_k = torch.full((P,), -1, dtype=torch.long, device=f.device)
        ia = torch.arange(P, device=f.device)  # the pairs still walking
        ca, boff = f, b * n_tri
        pfx, pfy, pox, poy = fx, fy, ox, oy
        for _ in range(_AA_MAX_WALK):
            if ia.numel() == 0:
                break
            row = boff + ca
            tx, ty = fsx.index_select(0, row), fsy.index_select(0, row)
            e_f = _edge_functions(tx, ty, pfx, pfy)
            e_o = _edge_functions(tx, ty, pox, poy)
            orient = torch.sign(_edge_functions(tx, ty, tx[:, 2], ty[:, 2])[:, :1])  # sign of the area
            leaving = (e_o - e_f) * orient < 0  # edge functions decreasing towards the other pixel
            t = e_f / torch.where(leaving, e_f - e_o, torch.ones_like(e_f))
            t = torch.where(leaving, t, torch.full_like(t, float("inf")))
            t_exit, k = t.min(-1)
            valid = fok.index_select(0, row) & (orient[:, 0] != 0) & (t_exit < 1.0) & torch.isfinite(t_exit)
            is_sil = sil_flat.index_select(0, row * 3 + k) & valid
            found_k[ia[is_sil]] = k[is_sil]
            cur[ia[is_sil]] = ca[is_sil]
            nxt = nb_flat.index_select(0, ca * 3 + k)
            go = (valid & ~is_sil & (nxt >= 0)).nonzero().squeeze(1)
            ia, ca, boff = ia[go], nxt[go], boff[go]
            pfx, pfy, pox, poy = pfx[go], pfy[go], pox[go], poy[go]
        ok = found_k >= 0
    if not bool(ok.any()):
        return color
    sel = ok.nonzero().squeeze(1)
    fcur, kk = cur[sel], found_k[sel]
    bsel = b[sel]
    v = pos[bsel[:, None], tri[fcur]]  # [P', 3, 4], differentiable
    sx = (v[..., 0] / v[..., 3] + 1.0) * (0.5 * W) - 0.5
    sy = (v[..., 1] / v[..., 3] + 1.0) * (0.5 * H) - 0.5
    e_f = _edge_functions(sx, sy, fx[sel], fy[sel]).gather(1, kk[:, None]).squeeze(1)
    e_o = _edge_functions(sx, sy, ox[sel], oy[sel]).gather(1, kk[:, None]).squeeze(1)
    ex = (sx.roll(-1, 1) - sx).gather(1, kk[:, None]).squeeze(1).detach()
    ey = (sy.roll(-1, 1) - sy).gather(1, kk[:, None]).squeeze(1).detach()
    # Each edge is handled by the pixel pairs across its minor axis only.
    minor_ok = torch.where(hz[sel], ey.abs() >= ex.abs(), ex.abs() > ey.abs())
    t = (e_f / (e_f - e_o))[minor_ok]  # [P'']
    fpix, opix = fpix[sel][minor_ok], opix[sel][minor_ok]
    if fpix.numel() == 0:
        return color
    flat = color.reshape(-1, C)
    c_f, c_o = flat[fpix], flat[opix]
    # t < 1/2: the front pixel is partly uncovered and takes some of the other colour; t > 1/2:
    # the front triangle reaches into the other pixel.
    wf = (0.5 - t).clamp(min=0)[:, None]
    wo = (t - 0.5).clamp(min=0)[:, None]
    delta_idx = torch.cat([fpix, opix])
    delta = torch.cat([wf * (c_o - c_f), wo * (c_f - c_o)]).to(color.dtype)
    return flat.index_add(0, delta_idx, delta).view(B, H, W, C)


def texture(
    tex: Float[Tensor, "B Ht Wt C"],
    uv: Float[Tensor, "B H W 2"],
    filter_mode: Literal["linear", "nearest"] = "linear",
    boundary_mode: Literal["clamp", "wrap"] = "clamp",
    backend: Backend = "auto",
) -> Float[Tensor, "B H W C"]:
    """Sample ``tex`` at ``uv`` in [0, 1]: u along the texture's width, v along its rows (v = 0 is row 0).

    Texel centres sit at (k + 0.5) / size, as in nvdiffrast. ``tex`` with batch 1 is shared.
    Differentiable w.r.t. ``tex`` and (for "linear") ``uv``.
    """
    if filter_mode not in ("linear", "nearest"):
        raise ValueError(f"filter_mode must be 'linear' or 'nearest' (no mipmaps in lift3d), got {filter_mode!r}")
    if boundary_mode not in ("clamp", "wrap"):
        raise ValueError(f"boundary_mode must be 'clamp' or 'wrap', got {boundary_mode!r}")
    if tex.ndim != 4 or uv.ndim != 4 or uv.shape[-1] != 2:
        raise ValueError(
            f"tex must be [B, Ht, Wt, C] and uv [B, H, W, 2], got {tuple(tex.shape)} and {tuple(uv.shape)}"
        )
    if _use_cuda(backend, tex, uv):
        return _nvdr.texture(tex.contiguous(), uv.contiguous(), filter_mode, boundary_mode)
    B = uv.shape[0]
    if tex.shape[0] == 1 and B > 1:
        tex = tex.expand(B, -1, -1, -1)
    img = tex.permute(0, 3, 1, 2)  # [B, C, Ht, Wt]
    Ht, Wt = img.shape[-2:]
    if boundary_mode == "wrap":
        uv = uv - torch.floor(uv)
        # One texel of circular padding lets bilinear filtering wrap across the seam.
        img = torch.cat([img[..., -1:, :], img, img[..., :1, :]], -2)
        img = torch.cat([img[..., -1:], img, img[..., :1]], -1)
        gu = (uv[..., 0] * Wt + 1.0) / (Wt + 2)
        gv = (uv[..., 1] * Ht + 1.0) / (Ht + 2)
    else:
        gu, gv = uv[..., 0], uv[..., 1]
    grid = torch.stack([gu, gv], -1) * 2.0 - 1.0
    mode = "bilinear" if filter_mode == "linear" else "nearest"
    out = F.grid_sample(img, grid.to(img.dtype), mode=mode, padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)


__all__ = ["rasterize", "interpolate", "antialias", "texture"]
