"""How faithful an export is: render the exported textured OBJ and the system's own model from the
same cameras and compare (PSNR).

Both sides are unlit albedo over black, so the comparison sees geometry and texture only: a shifted,
flipped or seamed texture, a lost part of the surface, or an isosurface at the wrong level all lower
the score, lighting does not. The system renders with ``shading="albedo"`` (materials that take it);
the OBJ is rasterized by the project's rasterizer and textured by bilinear lookup at interpolated UVs
(OBJ convention: v = 0 is the bottom row of the image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.utils.cameras import make_cameras
from lift3d.utils.rasterize_ops import antialias, interpolate, rasterize


def orbit_cameras(n_views: int = 4, size: int = 64, elevation: float = 20.0, distance: float = 2.0,
                  fovy: float = 40.0) -> dict[str, Any]:
    """``n_views`` cameras evenly spaced in azimuth (starting at the front, +x)."""
    return make_cameras(torch.full((n_views,), elevation), torch.arange(n_views) * (360.0 / n_views),
                        torch.full((n_views,), distance), torch.full((n_views,), fovy), size, size)


def render_obj(obj_path: str | Path, cams: dict[str, Any]) -> Tensor:
    """[B, H, W, 3] unlit render of a textured OBJ (its first material's diffuse map) over black."""
    import trimesh

    tm = trimesh.load(str(obj_path), process=False, force="mesh")
    uv = getattr(tm.visual, "uv", None)
    image = getattr(getattr(tm.visual, "material", None), "image", None)
    if uv is None or image is None:
        raise ValueError(f"{obj_path}: no UVs or no diffuse texture (map_Kd) to render")
    tex = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)  # [Ht, Wt, 3]
    v = torch.tensor(np.asarray(tm.vertices), dtype=torch.float32)
    tri = torch.tensor(np.asarray(tm.faces), dtype=torch.int32)
    H, W = int(cams["height"]), int(cams["width"])
    mvp = cams["mvp_mtx"].float()
    clip = torch.einsum("bij,vj->bvi", mvp, torch.cat([v, torch.ones_like(v[:, :1])], -1))
    rast = rasterize(clip, tri, (H, W))
    mask = (rast[..., 3:] > 0).float()
    gb_uv = interpolate(torch.tensor(np.asarray(uv), dtype=torch.float32), rast, tri)  # [B, H, W, 2]
    # grid_sample: x in [-1, 1] left to right, y in [-1, 1] top to bottom; OBJ's v grows upwards.
    grid = torch.stack([gb_uv[..., 0] * 2 - 1, (1 - gb_uv[..., 1]) * 2 - 1], -1)
    B = grid.shape[0]
    col = F.grid_sample(tex.permute(2, 0, 1)[None].expand(B, -1, -1, -1), grid, mode="bilinear",
                        padding_mode="border", align_corners=False).permute(0, 2, 3, 1)
    img = col * mask
    return antialias(img.contiguous(), rast, clip, tri).clamp(0, 1)


@torch.no_grad()
def render_system(system: Any, cams: dict[str, Any]) -> Tensor:
    """[B, H, W, 3] the system's own albedo render over black, in eval mode."""
    was_training = system.training
    system.eval()
    try:
        dev = next((p.device for p in system.parameters()), torch.device("cpu"))
        batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in cams.items()}
        black = torch.zeros(3, device=dev)
        out = system.renderer(**batch, shading="albedo", bg_color=black)
        return out["comp_rgb"].clamp(0, 1).cpu()
    finally:
        system.train(was_training)


def psnr(a: Tensor, b: Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)


def export_psnr(system: Any, obj_path: str | Path, n_views: int = 4, size: int = 64,
                elevation: float = 20.0) -> tuple[float, Tensor, Tensor]:
    """PSNR (dB) of the exported OBJ's render against the system's render; also both image stacks."""
    cams = orbit_cameras(n_views, size, elevation)
    ours = render_system(system, cams)
    theirs = render_obj(obj_path, cams)
    return psnr(ours, theirs), ours, theirs


__all__ = ["export_psnr", "orbit_cameras", "psnr", "render_obj", "render_system"]
