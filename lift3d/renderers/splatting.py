"""Gaussian splatting renderer: EWA projection and tile-based, depth-sorted alpha compositing.

Implements the differentiable rasteriser of "3D Gaussian Splatting for Real-Time Radiance Field
Rendering" (Kerbl et al., SIGGRAPH 2023), itself built on "EWA Splatting" (Zwicker et al., 2002):
each 3D covariance is carried to the image by the Jacobian of the perspective projection,
dilated by 0.3 px, and the Gaussians are composited front to back in depth order, a pixel
stopping once its transmittance would fall below 1e-4.

The torch path is complete and is the reference: projection is plain autograd; compositing is a
custom autograd function whose forward and backward both walk the depth-sorted per-tile lists
in chunks, batched over every tile of every image at once (no per-pixel or per-tile python
loops). The backward is analytic (3DGS's gradients, with the colour behind each Gaussian taken
as the total minus a running prefix); it reuses the forward's intermediates up to
``cache_elements`` pixel-Gaussian pairs and recomputes the rest, so memory is bounded by
``chunk_elements`` + ``cache_elements`` rather than by the number of Gaussians. The quadratic
form of each Gaussian is evaluated as one matmul against per-pixel monomials in tile-local
coordinates; binning uses each Gaussian's opacity-aware ellipse bounding box (no pixel outside it
can reach ``alpha_min``, beyond 3 sigma it is cut as in 3DGS). On
CUDA, when gsplat is importable, ``backend: auto`` uses gsplat's fused kernels instead
(:mod:`lift3d.backends.gsplat_backend`).

Colour: the geometry gives per-view RGB (spherical harmonics of degree 0..3 evaluated along the
camera-to-Gaussian direction, ``rgb = max(0, 0.5 + SH)``, or ``sigmoid(features_dc)`` with
``color_mode: rgb``). Gaussians are unshaded: the material is ignored.

Pixel convention matches :mod:`lift3d.utils.cameras`: pixel (row i, column j) has its centre at
``(u, v) = (j + 0.5, i + 0.5)``, row 0 at the top, ``u = W/2 + f x_c / d``,
``v = H/2 - f y_c / d`` for camera-space (OpenGL) ``(x_c, y_c, z_c)`` at depth ``d = -z_c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.utils.checkpoint
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.registry import register
from lift3d.renderers.base import BaseRenderer
from lift3d.utils.cameras import focal_from_fovy, get_rays
from lift3d.utils.gaussian_math import covariance_3d

# ---------------------------------------------------------------------------------------------
# Projection


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    w2c: Tensor,
    focal: Tensor,
    height: int,
    width: int,
    near_plane: float = 0.01,
    eps2d: float = 0.3,
) -> dict[str, Tensor]:
    """EWA projection of 3D Gaussians into B views.

    Args:
        means: [N, 3] world positions. quats: [N, 4] (w, x, y, z). scales: [N, 3] activated (> 0).
        w2c: [B, 4, 4] world-to-camera (OpenGL camera axes). focal: [B] focal length in pixels.
    Returns:
        means2d [B, N, 2] pixel coordinates (u, v); conics [B, N, 3] inverse 2D covariance (a, b, c)
        with ``cov^-1 = [[a, b], [b, c]]``; depths [B, N] (distance along the view axis);
        radii [B, N] long (3-sigma pixel radius, 0 for culled Gaussians); cov2d [B, N, 2, 2] (dilated);
        compensation [B, N]: sqrt(det(cov) / det(cov + eps2d I)), the factor by which the antialiased
        mode scales opacities so that the dilation spreads a Gaussian's weight instead of adding to it.
    """
    R = w2c[:, :3, :3]  # [B, 3, 3]
    t = w2c[:, :3, 3]  # [B, 3]
    pc = torch.einsum("bij,nj->bni", R, means) + t[:, None, :]  # [B, N, 3]
    depth = -pc[..., 2]
    in_front = depth > near_plane
    d = torch.where(in_front, depth, torch.ones_like(depth))
    f = focal.to(means)[:, None]  # [B, 1]
    x, y = pc[..., 0], pc[..., 1]
    u = 0.5 * width + f * x / d
    v = 0.5 * height - f * y / d
    # 3DGS clamps the Jacobian's x/z, y/z to 1.3x the frustum so Gaussians far off-screen do not blow up.
    limx = 1.3 * 0.5 * width / f
    limy = 1.3 * 0.5 * height / f
    xc = torch.maximum(torch.minimum(x / d, limx), -limx) * d
    yc = torch.maximum(torch.minimum(y / d, limy), -limy) * d
    zero = torch.zeros_like(d)
    J = torch.stack(
        [f / d, zero, f * xc / (d * d), zero, -f / d, -f * yc / (d * d)], dim=-1
    ).reshape(*d.shape, 2, 3)  # [B, N, 2, 3]
    cov3 = covariance_3d(quats, scales)  # [N, 3, 3]
    T = J @ R[:, None]  # [B, N, 2, 3]
    cov2 = T @ cov3[None] @ T.transpose(-1, -2)  # [B, N, 2, 2]
    det_raw = cov2[..., 0, 0] * cov2[..., 1, 1] - cov2[..., 0, 1] * cov2[..., 0, 1]
    a = cov2[..., 0, 0] + eps2d
    b = cov2[..., 0, 1]
    c = cov2[..., 1, 1] + eps2d
    det = a * c - b * b
    ok = in_front & (det > 0)
    det_s = torch.where(ok, det, torch.ones_like(det))
    conics = torch.stack([c / det_s, -b / det_s, a / det_s], dim=-1)  # [B, N, 3]
    with torch.no_grad():
        mid = 0.5 * (a + c)
        lam = mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.1))
        r = torch.ceil(3.0 * torch.sqrt(lam))
        on_screen = (u + r > 0) & (u - r < width) & (v + r > 0) & (v - r < height)
        radii = torch.where(ok & on_screen, r, torch.zeros_like(r)).long()
    cov2d = torch.stack([a, b, b, c], -1).reshape(*a.shape, 2, 2)
    compensation = torch.sqrt(torch.clamp(det_raw, min=0.0) / det_s)
    return {"means2d": torch.stack([u, v], -1), "conics": conics, "depths": depth, "radii": radii, "cov2d": cov2d,
            "compensation": compensation}


# ---------------------------------------------------------------------------------------------
# Tile binning


@dataclass
class TileBins:
    """Depth-sorted Gaussian lists per tile, for all B images at once.

    flat [total] long: indices into the flattened [B*N] Gaussians, grouped by tile, front to back within
    a tile; starts, counts [B*nty*ntx]: each tile's slice of ``flat``; max_count: the longest list;
    centers [nty*ntx, 2] pixel coordinates of each tile's centre; mono [P, 6]
    monomials (1, x, y, x^2, y^2, xy) of the P = ts^2 pixel centres relative to their tile's centre.
    """

    flat: Tensor
    starts: Tensor
    counts: Tensor
    max_count: int
    centers: Tensor
    mono: Tensor
    tile_size: int
    n_tiles_x: int
    n_tiles_y: int

    def chunk(self, tiles: Tensor, l0: int, l1: int) -> Tensor:
        """[len(tiles), l1 - l0] entries l0..l1 of the given tiles' lists, -1 past a list's end."""
        k = torch.arange(l0, l1, device=tiles.device)
        valid = k[None, :] < self.counts[tiles, None]
        pos = (self.starts[tiles, None] + k[None, :]).clamp_max(max(self.flat.numel() - 1, 0))
        return torch.where(valid, self.flat[pos], -1)


def tile_rects(means2d: Tensor, radii: Tensor, tile_size: int, ntx: int, nty: int) -> tuple[Tensor, ...]:
    """Tile ranges [x0, x1) x [y0, y1) covered by each Gaussian's box, all [B, N].

    ``radii`` is [B, N] (a square of that half-size, 3DGS) or [B, N, 2] (per-axis half-widths);
    0 marks a culled Gaussian.
    """
    u, v = means2d[..., 0].detach(), means2d[..., 1].detach()
    r = radii.detach().to(u.dtype)
    rx, ry = (r[..., 0], r[..., 1]) if r.ndim == u.ndim + 1 else (r, r)
    x0 = torch.floor((u - rx) / tile_size).clamp(0, ntx).long()
    x1 = (torch.floor((u + rx) / tile_size) + 1).clamp(0, ntx).long()
    y0 = torch.floor((v - ry) / tile_size).clamp(0, nty).long()
    y1 = (torch.floor((v + ry) / tile_size) + 1).clamp(0, nty).long()
    vis = (rx > 0) & (ry > 0)
    x1 = torch.where(vis, x1, x0)
    y1 = torch.where(vis, y1, y0)
    return x0, x1, y0, y1


@torch.no_grad()
def splat_extents(cov2d: Tensor, opacities: Tensor, radii: Tensor, alpha_min: float, n_sigma: float = 3.0) -> Tensor:
    """[B, N, 2] per-axis pixel half-widths of the region where a Gaussian can matter.

    The ellipse ``maha^2 <= t`` with ``t = min(n_sigma^2, 2 ln(opacity / alpha_min))``: beyond it
    alpha < alpha_min (skipped anyway) or the 3-sigma cut-off of 3DGS applies. Its bounding box has
    half-widths ``sqrt(t cov_xx)``, ``sqrt(t cov_yy)``; tighter than 3DGS's square of the largest
    eigenvalue for faint or elongated Gaussians. cov2d [B, N, 2, 2]; opacities, radii [B, N].
    """
    t = torch.full_like(opacities, n_sigma * n_sigma)
    if alpha_min > 0:
        t = torch.minimum(t, 2.0 * torch.log(opacities.clamp_min(1e-30) / alpha_min))
    t = torch.where(radii > 0, t, torch.zeros_like(t)).clamp_min(0.0)
    diag = torch.diagonal(cov2d, dim1=-2, dim2=-1).clamp_min(0.0)  # [B, N, 2]
    return torch.sqrt(t[..., None] * diag)


@torch.no_grad()
def bin_gaussians(means2d: Tensor, depths: Tensor, radii: Tensor, height: int, width: int, tile_size: int = 8) -> TileBins:
    """Sort every (tile, Gaussian) overlap by tile then depth: per-tile front-to-back lists (CSR layout)."""
    B, N = depths.shape
    dev = means2d.device
    ntx, nty = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles = ntx * nty
    x0, x1, y0, y1 = tile_rects(means2d, radii, tile_size, ntx, nty)
    wx = (x1 - x0).reshape(-1)
    cnt = (wx * (y1 - y0).reshape(-1)).clamp_min(0)  # [B*N]
    total = int(cnt.sum())
    # Tile-local coordinates keep the expanded quadratic form well conditioned in float32.
    jj = torch.arange(tile_size, device=dev, dtype=means2d.dtype) + 0.5 - 0.5 * tile_size
    iy, ix = torch.meshgrid(jj, jj, indexing="ij")
    x, y = ix.reshape(-1), iy.reshape(-1)
    mono = torch.stack([torch.ones_like(x), x, y, x * x, y * y, x * y], -1)  # [P, 6]
    tyy, txx = torch.meshgrid(torch.arange(nty, device=dev), torch.arange(ntx, device=dev), indexing="ij")
    centers = (torch.stack([txx.reshape(-1), tyy.reshape(-1)], -1).to(means2d.dtype) + 0.5) * tile_size  # [n_tiles, 2]
    if total == 0:
        zeros = torch.zeros(B * n_tiles, dtype=torch.long, device=dev)
        return TileBins(torch.zeros(0, dtype=torch.long, device=dev), zeros, zeros, 0, centers, mono, tile_size, ntx, nty)
    inst = torch.repeat_interleave(torch.arange(B * N, device=dev), cnt)  # [total]
    first = torch.cumsum(cnt, 0) - cnt
    local = torch.arange(total, device=dev) - first[inst]
    w = wx[inst].clamp_min(1)
    tx = x0.reshape(-1)[inst] + local % w
    ty = y0.reshape(-1)[inst] + local // w
    b = inst // N
    tile = (b * nty + ty) * ntx + tx  # [total] global tile id
    # One sort on (tile, depth rank) keeps each tile's list front to back.
    rank = torch.empty(B * N, dtype=torch.long, device=dev)
    rank[torch.argsort(depths.detach().reshape(-1))] = torch.arange(B * N, device=dev)
    key = tile * (B * N) + rank[inst]
    order = torch.argsort(key)
    tile_s, inst_s = tile[order], inst[order]
    counts = torch.bincount(tile_s, minlength=B * n_tiles)
    starts = torch.cumsum(counts, 0) - counts
    return TileBins(inst_s, starts, counts, int(counts.max()), centers, mono, tile_size, ntx, nty)


# ---------------------------------------------------------------------------------------------
# Compositing (custom autograd: chunked forward and recomputing backward)


def _chunk_alpha(idx, T_in, done, centers, mono, means2d, conics, opac, alpha_min, alpha_max, t_min, backward=False):
    """Alphas of one chunk of per-tile lists. idx [Ta, K]; T_in, done [Ta, P]; centers [Ta, 2]; mono [P, 6]."""
    valid = idx >= 0
    g = idx.clamp_min(0)
    m = means2d[g] - centers[:, None, :]  # [Ta, K, 2] tile-local means
    co = conics[g]  # [Ta, K, 3]
    o = opac[g] * valid  # [Ta, K]
    a, b, c = co.unbind(-1)
    mx, my = m.unbind(-1)
    # power = -0.5 (a dx^2 + c dy^2) - b dx dy, expanded in pixel monomials: one matmul instead of ~10 passes.
    coef = torch.stack([-0.5 * (a * mx * mx + c * my * my) - b * mx * my, a * mx + b * my, c * my + b * mx,
                        -0.5 * a, -0.5 * c, -b], 1)  # [Ta, 6, K]
    power = torch.matmul(mono, coef)  # [Ta, P, K]
    # exp(-30) is far below any alpha_min in use; the floor avoids slow denormal arithmetic.
    gauss = torch.exp(torch.clamp(power, min=-30.0, max=0.0))
    raw = o[:, None, :] * gauss
    alpha = torch.clamp(raw, max=alpha_max)
    # Conics are positive definite (det > 0 is checked at projection), so power <= 0 up to rounding of the
    # expansion; the clamp above handles that rounding at the mean, so no power > 0 cull here.
    if alpha_min > 0:
        keep = alpha >= alpha_min  # padded slots have o = 0 and fail this too
    else:
        keep = valid[:, None, :] & (alpha >= alpha_min)
    alpha = torch.where(keep, alpha, 0.0)
    # A pixel stops before the Gaussian that would take its transmittance below t_min (3DGS). T only
    # decreases along the list, so the included Gaussians are a prefix and the unmasked running product
    # already is each included Gaussian's transmittance.
    cp = torch.cumprod(1.0 - alpha, dim=-1)  # [Ta, P, K]
    T_incl = T_in[..., None] * cp
    include = T_incl >= t_min
    include &= ~done[..., None]
    alpha = torch.where(include, alpha, 0.0)
    T_excl = torch.cat([T_in[..., None], T_incl[..., :-1]], -1)
    n_inc = include.sum(-1, keepdim=True)  # [Ta, P, 1]
    T_out = torch.where(n_inc > 0, T_incl.gather(-1, (n_inc - 1).clamp_min(0)), T_in[..., None]).squeeze(-1)
    done_out = done | (T_incl[..., -1] < t_min)
    # Where alpha responds to the Gaussian's parameters: kept, included and below the clamp.
    live = (keep & include & (raw < alpha_max)) if backward else None
    return g, m, co, gauss, alpha, live, T_excl, T_out, done_out


def _chunk_len(L: int, rows: int, budget: int) -> int:
    # Short chunks let finished tiles drop out early; the budget bounds memory.
    return max(4, min(max(L, 1), 128, budget // max(1, rows)))


class _RasterizeTiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opac, feats, bins: TileBins, alpha_min, alpha_max, t_min, chunk_elements,
                cache_elements):
        # means2d [M, 2], conics [M, 3], opac [M], feats [M, C] with M = B*N.
        nT = bins.counts.shape[0]
        P = bins.tile_size**2
        n_img_tiles = bins.centers.shape[0]
        out = feats.new_zeros(nT, P, feats.shape[1])
        Tc = feats.new_ones(nT, P)
        done = torch.zeros(nT, P, dtype=torch.bool, device=feats.device)
        L = bins.max_count
        active = torch.nonzero(bins.counts > 0).squeeze(1)
        K = _chunk_len(L, active.numel() * P, chunk_elements)
        centers, mono = bins.centers.to(feats.dtype), bins.mono.to(feats.dtype)
        saved = []
        grad = any(ctx.needs_input_grad[:4])
        cached = 0
        l0 = 0
        while l0 < L and active.numel() > 0:
            l1 = min(L, l0 + K)
            T_in, dn = Tc[active], done[active]
            n_el = active.numel() * P * (l1 - l0)
            keep_it = grad and cached + n_el <= cache_elements
            res = _chunk_alpha(bins.chunk(active, l0, l1), T_in, dn, centers[active % n_img_tiles], mono, means2d,
                               conics, opac, alpha_min, alpha_max, t_min, backward=keep_it)
            g, alpha, T_excl, T_out, dn_out = res[0], res[4], res[6], res[7], res[8]
            w = alpha * T_excl  # [Ta, P, K]
            out[active] += torch.einsum("tpk,tkc->tpc", w, feats[g])
            # Within the budget, the backward reuses this chunk's intermediates instead of recomputing them.
            saved.append((active, l0, l1, T_in, dn, res[:7] if keep_it else None))
            cached += n_el if keep_it else 0
            Tc[active] = T_out
            done[active] = dn_out
            l0 = l1
            still = (bins.counts[active] > l0) & ~dn_out.all(1)
            active = active[still]
            if active.numel():
                K = _chunk_len(L, active.numel() * P, chunk_elements)
        ctx.bins, ctx.saved_chunks = bins, saved
        ctx.consts = (alpha_min, alpha_max, t_min)
        ctx.save_for_backward(means2d, conics, opac, feats, out)
        # Opacity is differentiable through a ones channel of feats; the raw transmittance is not.
        ctx.mark_non_differentiable(Tc)
        return out, Tc

    @staticmethod
    def backward(ctx, g_out, g_T):
        means2d, conics, opac, feats, out = ctx.saved_tensors
        bins, alpha_min, alpha_max, t_min = ctx.bins, *ctx.consts
        n_img_tiles = bins.centers.shape[0]
        centers, mono = bins.centers.to(feats.dtype), bins.mono.to(feats.dtype)
        g_m = torch.zeros_like(means2d)
        g_co = torch.zeros_like(conics)
        g_o = torch.zeros_like(opac)
        g_f = torch.zeros_like(feats)
        g_out = g_out.contiguous()
        # dL/dC . C per pixel, and the running dot with the colour composited so far.
        total = (g_out * out).sum(-1)  # [nT, P]
        acc = torch.zeros_like(total)
        for active, l0, l1, T_in, dn, cache in ctx.saved_chunks:
            if cache is None:
                cache = _chunk_alpha(bins.chunk(active, l0, l1), T_in, dn, centers[active % n_img_tiles], mono,
                                     means2d, conics, opac, alpha_min, alpha_max, t_min, backward=True)
            g, m, co, gauss, alpha, live, T_excl = cache[:7]
            go = g_out[active]  # [Ta, P, C]
            f = feats[g]  # [Ta, K, C]
            w = alpha * T_excl
            G = torch.einsum("tpc,tkc->tpk", go, f)
            wG = w * G
            # Colour behind each Gaussian, dotted with dL/dC: what its (1 - alpha) factor attenuates.
            behind = (total[active] - acc[active])[..., None] - torch.cumsum(wG, -1)
            acc[active] += wG.sum(-1)
            d_lin = (T_excl * G - behind / (1.0 - alpha)) * live  # d loss / d alpha where alpha is live
            d_pow = d_lin * alpha  # [Ta, P, K]
            gi = g.reshape(-1)
            g_o.index_add_(0, gi, (d_lin * gauss).sum(1).reshape(-1))
            # Pixel sums of d_pow times each monomial give every mean and conic gradient (one matmul).
            S0, Sx, Sy, Sxx, Syy, Sxy = torch.matmul(d_pow.transpose(1, 2), mono).unbind(-1)  # [Ta, K] each
            a, b, c = co.unbind(-1)
            mx, my = m.unbind(-1)
            sdx, sdy = Sx - mx * S0, Sy - my * S0  # sum d_pow * dx, sum d_pow * dy
            sdxx = Sxx - 2 * mx * Sx + mx * mx * S0
            sdyy = Syy - 2 * my * Sy + my * my * S0
            sdxy = Sxy - mx * Sy - my * Sx + mx * my * S0
            g_m.index_add_(0, gi, torch.stack([a * sdx + b * sdy, c * sdy + b * sdx], -1).reshape(-1, 2))
            g_co.index_add_(0, gi, torch.stack([-0.5 * sdxx, -sdxy, -0.5 * sdyy], -1).reshape(-1, 3))
            g_f.index_add_(0, gi, torch.einsum("tpk,tpc->tkc", w, go).reshape(-1, feats.shape[1]))
        return g_m, g_co, g_o, g_f, None, None, None, None, None, None


def rasterize_gaussians(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    depths: Tensor,
    radii: Tensor,
    height: int,
    width: int,
    tile_size: int = 8,
    alpha_min: float = 1.0 / 255.0,
    alpha_max: float = 0.99,
    transmittance_min: float = 1e-4,
    chunk_elements: int = 1 << 21,
    cache_elements: int = 1 << 23,
) -> Tensor:
    """Composite projected Gaussians front to back, tiled (torch reference path).

    Args:
        means2d [B, N, 2] pixels; conics [B, N, 3]; opacities [B, N] in [0, 1]; features [B, N, C];
        depths [B, N] (sort key); radii [B, N] square or [B, N, 2] per-axis pixel half-widths of each
        Gaussian's box (0 = culled; see :func:`splat_extents`).
    Returns:
        [B, H, W, C]: sum_k f_k alpha_k T_k (composited over zero). Append a ones channel to
        ``features`` to get the opacity ``1 - T_final``. Memory: ``chunk_elements`` pixel-Gaussian
        pairs are evaluated at once; up to ``cache_elements`` pairs' intermediates (~13 bytes each in
        float32) are kept for the backward pass, the rest are recomputed there.
    """
    B, N = depths.shape
    C = features.shape[-1]
    bins = bin_gaussians(means2d, depths, radii, height, width, tile_size)
    out, _ = _RasterizeTiles.apply(
        means2d.reshape(B * N, 2), conics.reshape(B * N, 3), opacities.reshape(B * N), features.reshape(B * N, C),
        bins, alpha_min, alpha_max, transmittance_min, chunk_elements, cache_elements)
    ts, ntx, nty = tile_size, bins.n_tiles_x, bins.n_tiles_y
    img = out.reshape(B, nty, ntx, ts, ts, C).permute(0, 1, 3, 2, 4, 5).reshape(B, nty * ts, ntx * ts, C)
    return img[:, :height, :width]


def rasterize_gaussians_dense(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    depths: Tensor,
    radii: Tensor,
    height: int,
    width: int,
    tile_size: int = 8,
    alpha_min: float = 1.0 / 255.0,
    alpha_max: float = 0.99,
    transmittance_min: float = 1e-4,
    chunk: int = 256,
) -> Tensor:
    """Naive baseline: every pixel against every Gaussian, in depth-sorted chunks, plain autograd.

    Same inputs, outputs and cut-offs as :func:`rasterize_gaussians` (a Gaussian only touches
    pixels in the tiles its 3-sigma square overlaps), so the two agree to rounding; used as the
    reference in tests and the baseline in ``bench/render_splat.py``. Memory grows with H*W*N.
    """
    B, N = depths.shape
    C = features.shape[-1]
    dev, dt = means2d.device, means2d.dtype
    ys, xs = torch.meshgrid(torch.arange(height, device=dev, dtype=dt) + 0.5,
                            torch.arange(width, device=dev, dtype=dt) + 0.5, indexing="ij")
    px, py = xs.reshape(-1, 1), ys.reshape(-1, 1)  # [HW, 1]
    ptx, pty = (px // tile_size).long(), (py // tile_size).long()
    ntx, nty = math.ceil(width / tile_size), math.ceil(height / tile_size)
    x0, x1, y0, y1 = tile_rects(means2d, radii, tile_size, ntx, nty)
    def step(out, T, done, m, co, op, feat, bx0, bx1, by0, by1):
        dx, dy = px - m[None, :, 0], py - m[None, :, 1]  # [HW, k]
        power = -0.5 * (co[:, 0] * dx * dx + co[:, 2] * dy * dy) - co[:, 1] * dx * dy
        alpha = torch.clamp(op * torch.exp(torch.clamp(power, min=-30.0, max=0.0)), max=alpha_max)
        inside = (ptx >= bx0) & (ptx < bx1) & (pty >= by0) & (pty < by1)
        keep = inside & (alpha >= alpha_min)
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
        cp = T[:, None] * torch.cumprod(1 - alpha, -1)
        include = (cp >= transmittance_min) & ~done[:, None]
        alpha = torch.where(include, alpha, torch.zeros_like(alpha))
        one_m = 1 - alpha
        Tex = T[:, None] * torch.cat([torch.ones_like(one_m[:, :1]), torch.cumprod(one_m, -1)[:, :-1]], -1)
        return out + (alpha * Tex) @ feat, Tex[:, -1] * one_m[:, -1], done | (cp[:, -1] < transmittance_min)

    imgs = []
    for b in range(B):
        order = torch.argsort(depths[b].detach())
        order = order[((x1[b] > x0[b]) & (y1[b] > y0[b]))[order]]
        out = features.new_zeros(height * width, C)
        T = features.new_ones(height * width)
        done = torch.zeros(height * width, dtype=torch.bool, device=dev)
        for k0 in range(0, order.numel(), chunk):
            idx = order[k0 : k0 + chunk]
            args = (means2d[b, idx], conics[b, idx], opacities[b, idx], features[b, idx],
                    x0[b, idx], x1[b, idx], y0[b, idx], y1[b, idx])
            if torch.is_grad_enabled():
                # Recompute each chunk in backward: memory stays O(H*W*chunk) instead of O(H*W*N).
                out, T, done = torch.utils.checkpoint.checkpoint(step, out, T, done, *args, use_reentrant=False)
            else:
                out, T, done = step(out, T, done, *args)
        imgs.append(out.reshape(height, width, C))
    return torch.stack(imgs, 0)


def render_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    c2w: Tensor,
    fovy: Tensor,
    height: int,
    width: int,
    near_plane: float = 0.01,
    eps2d: float = 0.3,
    tile_size: int = 8,
    alpha_min: float = 1.0 / 255.0,
    alpha_max: float = 0.99,
    transmittance_min: float = 1e-4,
    chunk_elements: int = 1 << 21,
    cache_elements: int = 1 << 23,
    dense: bool = False,
    viewspace_points: Tensor | None = None,
    rasterize_mode: str = "classic",
) -> dict[str, Tensor]:
    """Render Gaussians with the torch path.

    Args:
        means [N, 3]; quats [N, 4] (w, x, y, z); scales [N, 3] activated; opacities [N] or [N, 1]
        in [0, 1]; colors [N, 3] or [B, N, 3]; c2w [B, 4, 4]; fovy [B] degrees.
        viewspace_points: optional [B, N, 2] zeros with requires_grad; its gradient becomes the
        gradient of the projected means in NDC units (pixels * 2 / size), for densification.
        dense: use the naive all-pixels baseline instead of tiles.
        rasterize_mode: 'classic' (3DGS: the dilation adds coverage) or 'antialiased' (opacities
        scaled by the projection's ``compensation``, as Mip-Splatting and gsplat's mode of that name).
    Returns:
        rgb [B,H,W,3] (over zero), opacity [B,H,W,1], depth [B,H,W,1] (sum of alpha-weighted view
        depths, over zero), means2d [B,N,2], radii [B,N].
    """
    B = c2w.shape[0]
    dt = means.dtype
    w2c = torch.linalg.inv(c2w.to(dt))
    focal = focal_from_fovy(fovy.to(dt), height)
    proj = project_gaussians(means, quats, scales, w2c, focal, height, width, near_plane, eps2d)
    means2d = proj["means2d"]
    if viewspace_points is not None:
        # Zero-valued leaf: shifts nothing, but receives d loss / d mean in NDC units.
        means2d = means2d + viewspace_points * means2d.new_tensor([0.5 * width, 0.5 * height])
    N = means.shape[0]
    op = opacities.reshape(1, N).expand(B, N)
    if rasterize_mode == "antialiased":
        op = op * proj["compensation"]
    elif rasterize_mode != "classic":
        raise ValueError(f"rasterize_mode must be 'classic' or 'antialiased', got {rasterize_mode!r}")
    col = colors if colors.ndim == 3 else colors[None].expand(B, N, colors.shape[-1])
    feats = torch.cat([col, proj["depths"][..., None], torch.ones_like(proj["depths"][..., None])], -1)
    fn = rasterize_gaussians_dense if dense else rasterize_gaussians
    kw = {} if dense else {"chunk_elements": chunk_elements, "cache_elements": cache_elements}
    extents = splat_extents(proj["cov2d"].detach(), op.detach(), proj["radii"], alpha_min)
    img = fn(means2d, proj["conics"], op, feats, proj["depths"], extents, height, width, tile_size,
             alpha_min, alpha_max, transmittance_min, **kw)
    C = col.shape[-1]
    return {
        "rgb": img[..., :C],
        "depth": img[..., C : C + 1],
        "opacity": img[..., C + 1 : C + 2],
        "means2d": means2d,
        "radii": proj["radii"],
    }


# ---------------------------------------------------------------------------------------------
# The registered renderer


@register("gaussian-splatting-renderer")
class GaussianSplattingRenderer(BaseRenderer):
    """Renders a ``gaussian-splatting`` geometry; outputs also carry what densification needs."""

    @dataclass
    class Config(BaseRenderer.Config):
        backend: Literal["auto", "torch", "gsplat"] = "auto"
        """'auto': gsplat when importable and the Gaussians are on CUDA, else torch; 'torch' forces the reference."""
        tile_size: int = 8
        """Tile edge in pixels for binning Gaussians (torch path); 8 wastes fewer pixel-Gaussian pairs on CPU than 16."""
        near_plane: float = 0.01
        """Gaussians closer than this to the camera plane are culled."""
        eps2d: float = 0.3
        """Dilation (pixels^2) added to the 2D covariance diagonal, as 3DGS, so every Gaussian covers a pixel."""
        rasterize_mode: Literal["classic", "antialiased"] = "classic"
        """'classic': the dilation adds coverage (3DGS), so Gaussians smaller than a pixel render more opaque
        than their 3D density; 'antialiased': opacities scaled by sqrt(det(cov) / det(cov + eps2d)) so they
        do not (Mip-Splatting; gsplat's mode of the same name), keeping renders and extracted meshes alike."""
        alpha_min: float = 0.00392156862745098
        """Alphas below this (1/255) are skipped."""
        alpha_max: float = 0.99
        """Alphas are clamped to this, keeping 1 - alpha invertible in the backward pass."""
        transmittance_min: float = 0.0001
        """A pixel stops compositing before its transmittance would fall below this."""
        chunk_elements: int = 2097152
        """Pixel-Gaussian pairs evaluated at once (bounds memory of the torch path)."""
        cache_elements: int = 8388608
        """Pixel-Gaussian pairs whose forward intermediates are kept for backward (~13 B each); the rest are recomputed."""
        dense: bool = False
        """Use the naive all-pixels-by-all-Gaussians torch baseline (slow; for checks)."""

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        if not 0.0 < self.cfg.alpha_max < 1.0:
            raise ConfigError(f"gaussian-splatting-renderer: alpha_max must be in (0, 1), got {self.cfg.alpha_max}")
        if self.cfg.tile_size < 1:
            raise ConfigError(f"gaussian-splatting-renderer: tile_size must be positive, got {self.cfg.tile_size}")

    def forward(
        self,
        c2w: Tensor,
        fovy: Tensor,
        height: int,
        width: int,
        rays_d: Tensor | None = None,
        light_positions: Tensor | None = None,
        bg_color: Any = None,
        camera_positions: Tensor | None = None,
        **ignored: Any,
    ) -> dict[str, Tensor]:
        geo = self.geometry
        B = c2w.shape[0]
        dev = geo.xyz.device
        c2w = c2w.to(dev).float()
        fovy = fovy.to(dev).float()
        cam_pos = c2w[:, :3, 3]
        colors = geo.colors(cam_pos)  # [B, N, 3]
        N = geo.xyz.shape[0]
        from lift3d.backends import gsplat_backend

        use_gsplat = self.cfg.backend == "gsplat" or (
            self.cfg.backend == "auto" and dev.type == "cuda" and gsplat_backend.available()
        )
        if use_gsplat:
            if not (dev.type == "cuda" and gsplat_backend.available()):
                raise RuntimeError("gaussian-splatting-renderer: backend 'gsplat' needs gsplat installed and CUDA tensors")
            r = gsplat_backend.render(
                geo.xyz, geo.rotation, geo.get_scaling, geo.get_opacity.squeeze(-1), colors, c2w, fovy, height, width,
                near_plane=self.cfg.near_plane, eps2d=self.cfg.eps2d, rasterize_mode=self.cfg.rasterize_mode)
            vs = r["means2d"]
            vs_scale = torch.tensor([0.5 * width, 0.5 * height], device=dev)
        else:
            vs = torch.zeros(B, N, 2, device=dev, dtype=geo.xyz.dtype, requires_grad=torch.is_grad_enabled())
            r = render_gaussians(
                geo.xyz, geo.rotation, geo.get_scaling, geo.get_opacity, colors, c2w, fovy, height, width,
                near_plane=self.cfg.near_plane, eps2d=self.cfg.eps2d, tile_size=self.cfg.tile_size,
                alpha_min=self.cfg.alpha_min, alpha_max=self.cfg.alpha_max,
                transmittance_min=self.cfg.transmittance_min, chunk_elements=self.cfg.chunk_elements,
                cache_elements=self.cfg.cache_elements,
                dense=self.cfg.dense, viewspace_points=vs if vs.requires_grad else None,
                rasterize_mode=self.cfg.rasterize_mode)
            vs_scale = None
        rgb_fg, opacity = r["rgb"], r["opacity"]
        bg = self._background(bg_color, rays_d, c2w, fovy, height, width, rgb_fg)
        out = {
            "comp_rgb": rgb_fg + (1.0 - opacity) * bg,
            "comp_rgb_fg": rgb_fg,
            "comp_rgb_bg": bg.expand_as(rgb_fg),
            "opacity": opacity,
            "depth": r["depth"],
            "viewspace_points": vs,
            "visibility_filter": r["radii"] > 0,
            "radii": r["radii"],
        }
        if vs_scale is not None:
            out["viewspace_grad_scale"] = vs_scale
        return out

    def _background(self, bg_color, rays_d, c2w, fovy, height, width, like: Tensor) -> Tensor:
        if bg_color is not None:
            bg = torch.as_tensor(bg_color, dtype=like.dtype, device=like.device)
            if bg.ndim == 0:
                bg = bg.expand(3)
            if bg.ndim == 1:
                return bg.view(1, 1, 1, -1)
            if bg.ndim == 2:  # [B, 3]
                return bg[:, None, None, :]
            return bg
        if self.background is None:
            return torch.zeros(1, 1, 1, like.shape[-1], dtype=like.dtype, device=like.device)
        if rays_d is None:
            _, rays_d = get_rays(c2w, fovy, height, width)
        return self.background(dirs=rays_d.to(like.device))


__all__ = [
    "GaussianSplattingRenderer",
    "project_gaussians",
    "bin_gaussians",
    "TileBins",
    "rasterize_gaussians",
    "rasterize_gaussians_dense",
    "render_gaussians",
]
