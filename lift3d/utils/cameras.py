"""The camera model shared by every renderer.

World: right-handed, +z up. A camera at elevation e, azimuth a (radians here), distance r sits at
``r * (cos e cos a, cos e sin a, sin e)``, looks at the origin, up +z. Azimuth 0 (+x) is the front.

Camera space follows OpenGL: +x right, +y up, the camera looks down -z. ``c2w`` is [B, 4, 4] with
columns (right, up, back, position). Pixels: row 0 is the top of the image. The projection puts
pixel (row i, column j) at NDC ``x = (2 (j + 0.5) / W - 1)``, ``y = (2 (i + 0.5) / H - 1)``, so
clip-space y grows *down* the image, matching a rasterizer that writes row 0 first; the rays from
:func:`get_rays` go through the same pixel centres.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def camera_positions(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    """[B] degrees, degrees, distance -> [B, 3] positions."""
    e = torch.deg2rad(elevation_deg)
    a = torch.deg2rad(azimuth_deg)
    return torch.stack(
        [distance * torch.cos(e) * torch.cos(a), distance * torch.cos(e) * torch.sin(a), distance * torch.sin(e)],
        dim=-1,
    )


def look_at_c2w(position: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """[B, 3] camera positions -> [B, 4, 4] camera-to-world (OpenGL axes) looking at ``target``."""
    if target is None:
        target = torch.zeros_like(position)
    if up is None:
        up = torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype, device=position.device).expand_as(position)
    forward = F.normalize(target - position, dim=-1)
    right = torch.cross(forward, up, dim=-1)
    # Looking straight up or down: any right vector perpendicular to forward will do.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    alt = torch.cross(forward, torch.tensor([1.0, 0.0, 0.0], dtype=position.dtype, device=position.device).expand_as(forward), dim=-1)
    right = F.normalize(torch.where(degenerate, alt, right), dim=-1)
    cam_up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(position.shape[0], 4, 4, dtype=position.dtype, device=position.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = cam_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = position
    c2w[:, 3, 3] = 1.0
    return c2w


def focal_from_fovy(fovy_deg: Tensor, height: int) -> Tensor:
    """Focal length in pixels for a vertical field of view."""
    return 0.5 * height / torch.tan(0.5 * torch.deg2rad(fovy_deg))


def projection_matrix(fovy_deg: Tensor, aspect: float, near: float = 0.01, far: float = 100.0) -> Tensor:
    """[B] fovy (degrees) -> [B, 4, 4] OpenGL-style projection with y flipped (row 0 = top)."""
    f = 1.0 / torch.tan(0.5 * torch.deg2rad(fovy_deg))
    proj = torch.zeros(fovy_deg.shape[0], 4, 4, dtype=fovy_deg.dtype, device=fovy_deg.device)
    proj[:, 0, 0] = f / aspect
    proj[:, 1, 1] = -f
    proj[:, 2, 2] = -(far + near) / (far - near)
    proj[:, 2, 3] = -2.0 * far * near / (far - near)
    proj[:, 3, 2] = -1.0
    return proj


def mvp_matrix(c2w: Tensor, proj: Tensor) -> Tensor:
    """[B, 4, 4] world -> clip."""
    return proj @ torch.linalg.inv(c2w)


def get_rays(c2w: Tensor, fovy_deg: Tensor, height: int, width: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Rays through pixel centres. Returns origins and directions, each [B, H, W, 3]."""
    B = c2w.shape[0]
    dev, dt = c2w.device, c2w.dtype
    focal = focal_from_fovy(fovy_deg.to(dt), height)  # [B]
    j = torch.arange(width, device=dev, dtype=dt) + 0.5
    i = torch.arange(height, device=dev, dtype=dt) + 0.5
    ii, jj = torch.meshgrid(i, j, indexing="ij")
    x = (jj - 0.5 * width)[None] / focal[:, None, None]
    y = -(ii - 0.5 * height)[None] / focal[:, None, None]
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [B, H, W, 3]
    dirs = torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], dirs_cam)
    if normalize:
        dirs = F.normalize(dirs, dim=-1)
    origins = c2w[:, None, None, :3, 3].expand(B, height, width, 3)
    return origins, dirs


def make_cameras(
    elevation_deg: Tensor,
    azimuth_deg: Tensor,
    distance: Tensor,
    fovy_deg: Tensor,
    height: int,
    width: int,
    light_positions: Tensor | None = None,
) -> dict[str, Tensor | int]:
    """Everything a renderer or guidance may need for a batch of orbit cameras, as one dict.

    Keys: rays_o, rays_d [B,H,W,3]; c2w, proj_mtx, mvp_mtx [B,4,4]; camera_positions,
    light_positions [B,3]; elevation, azimuth, camera_distances, fovy [B] (degrees); height, width.
    """
    pos = camera_positions(elevation_deg, azimuth_deg, distance)
    c2w = look_at_c2w(pos)
    proj = projection_matrix(fovy_deg, width / height)
    rays_o, rays_d = get_rays(c2w, fovy_deg, height, width)
    return {
        "rays_o": rays_o,
        "rays_d": rays_d,
        "c2w": c2w,
        "proj_mtx": proj,
        "mvp_mtx": mvp_matrix(c2w, proj),
        "camera_positions": pos,
        "light_positions": pos.clone() if light_positions is None else light_positions,
        "elevation": elevation_deg,
        "azimuth": azimuth_deg,
        "camera_distances": distance,
        "fovy": fovy_deg,
        "height": height,
        "width": width,
    }


def orbit(n: int, elevation_deg: float = 15.0, distance: float = 2.0, fovy_deg: float = 40.0, height: int = 64,
          width: int = 64, start_azimuth: float = 0.0) -> dict[str, Tensor | int]:
    """``n`` cameras evenly spaced in azimuth (a turntable)."""
    az = start_azimuth + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return make_cameras(full(elevation_deg), az, full(distance), full(fovy_deg), height, width)


__all__ = [
    "camera_positions",
    "look_at_c2w",
    "focal_from_fovy",
    "projection_matrix",
    "mvp_matrix",
    "get_rays",
    "make_cameras",
    "orbit",
]
