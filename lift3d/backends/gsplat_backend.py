"""Optional CUDA backend for Gaussian splatting: gsplat's fused ``rasterization``.

gsplat (Ye et al., "gsplat: An Open-Source Library for Gaussian Splatting", 2024) implements the
3DGS rasteriser (Kerbl et al., SIGGRAPH 2023) in CUDA. It is used only when importable and the
tensors are on CUDA; :mod:`lift3d.renderers.splatting` holds the torch reference it must match.

gsplat takes OpenCV cameras (x right, y down, z forward, world-to-camera) and intrinsics K; ours
are OpenGL camera-to-world with a vertical field of view, converted here. Both put pixel (i, j)'s
centre at (j + 0.5, i + 0.5) with the principal point at (W/2, H/2), so outputs line up.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:  # pragma: no cover - depends on the environment
    import gsplat as _gsplat

    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # ImportError, or a broken CUDA build raising at import
    _gsplat = None
    _IMPORT_ERROR = exc


def available() -> bool:
    """gsplat imported and a CUDA device exists."""
    return _gsplat is not None and torch.cuda.is_available()


def why_unavailable() -> str:
    if _gsplat is None:
        return f"gsplat is not importable ({_IMPORT_ERROR})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return ""


def camera_to_gsplat(c2w: Tensor, fovy_deg: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """OpenGL c2w [B, 4, 4] and fovy [B] (degrees) -> OpenCV viewmats [B, 4, 4] and Ks [B, 3, 3]."""
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=c2w.dtype, device=c2w.device))
    viewmats = flip @ torch.linalg.inv(c2w)
    f = 0.5 * height / torch.tan(0.5 * torch.deg2rad(fovy_deg.to(c2w.dtype)))
    Ks = torch.zeros(c2w.shape[0], 3, 3, dtype=c2w.dtype, device=c2w.device)
    Ks[:, 0, 0] = f
    Ks[:, 1, 1] = f
    Ks[:, 0, 2] = 0.5 * width
    Ks[:, 1, 2] = 0.5 * height
    Ks[:, 2, 2] = 1.0
    return viewmats, Ks


def render(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor, c2w: Tensor,
           fovy: Tensor, height: int, width: int, near_plane: float = 0.01, eps2d: float = 0.3,
           rasterize_mode: str = "classic", **kwargs: Any) -> dict[str, Tensor]:
    """Same contract as :func:`lift3d.renderers.splatting.render_gaussians` (rgb, opacity, depth over zero).

    means [N, 3]; quats [N, 4] wxyz; scales [N, 3] activated; opacities [N]; colors [B, N, 3] or [N, 3].
    ``means2d`` [B, N, 2] is gsplat's projected means in pixels, with ``retain_grad`` when it needs
    a gradient (its gradient is in pixels: scale by (W/2, H/2) for NDC units).
    """
    if not available():
        raise RuntimeError(f"gsplat backend unavailable: {why_unavailable()}")
    B = c2w.shape[0]
    viewmats, Ks = camera_to_gsplat(c2w.float(), fovy.float(), height, width)
    if colors.ndim == 2:
        colors = colors[None].expand(B, -1, -1)
    img, alpha, meta = _gsplat.rasterization(
        means, quats, scales, opacities.reshape(-1), colors, viewmats, Ks, width, height,
        near_plane=near_plane, eps2d=eps2d, packed=False, render_mode="RGB+D", rasterize_mode=rasterize_mode,
        **kwargs,
    )
    means2d = meta["means2d"]
    if means2d.requires_grad:
        means2d.retain_grad()
    radii = meta["radii"]
    if radii.ndim == 3:  # newer gsplat: per-axis radii
        radii = radii.amax(-1)
    return {
        "rgb": img[..., :3],
        "depth": img[..., 3:4],
        "opacity": alpha,
        "means2d": means2d,
        "radii": radii.long(),
    }


__all__ = ["available", "why_unavailable", "camera_to_gsplat", "render"]
