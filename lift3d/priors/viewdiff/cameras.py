"""Cameras as ViewDiff's layers read them: lift3d's world and camera axes, normalised intrinsics,
and the per-view condition vector of the cross-frame attention.

Conventions (the same as :mod:`lift3d.utils.cameras`, which every renderer uses):

* World: right-handed, +z up; objects sit around the origin.
* ``c2w`` ``[N, 4, 4]``: camera-to-world with OpenGL camera axes, its columns (right, up, back,
  position): the camera looks along its -z axis, +y is up in the image.
* ``intrinsics`` ``[N, 3, 3]``: a pinhole matrix *normalised by the image size*, in the usual
  pixel convention (u to the right, v down the image, (0, 0) the top-left corner of the image and
  (1, 1) the bottom-right one), applied to OpenCV camera coordinates ``(x, -y, -z)`` of the OpenGL
  ones. A centred camera with vertical field of view ``fovy`` on an ``H x W`` image has
  ``fy = 0.5 / tan(fovy / 2)``, ``fx = fy * H / W`` and principal point ``(0.5, 0.5)``. Being
  normalised, one matrix serves every feature resolution of the UNet.

The pixel centre of column j, row i of a ``H x W`` map is at ``((j + 0.5) / W, (i + 0.5) / H)``,
so the rays of :func:`pixel_rays` on an image are the rays of :func:`lift3d.utils.cameras.get_rays`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

#: Width of the per-view condition vector (see :func:`view_condition`).
COND_DIM = 9


def intrinsics_from_fovy(fovy_deg: Tensor, aspect: float = 1.0) -> Float[Tensor, "N 3 3"]:
    """Normalised intrinsics of centred cameras with vertical field of view ``fovy_deg`` ``[N]``
    on images of width / height ``aspect`` (square pixels)."""
    fovy = torch.as_tensor(fovy_deg, dtype=torch.float32).reshape(-1)
    fy = 0.5 / torch.tan(0.5 * torch.deg2rad(fovy))
    K = torch.zeros(fovy.shape[0], 3, 3, dtype=fovy.dtype, device=fovy.device)
    K[:, 0, 0] = fy / aspect
    K[:, 1, 1] = fy
    K[:, 0, 2] = 0.5
    K[:, 1, 2] = 0.5
    K[:, 2, 2] = 1.0
    return K


def world_to_pixels(points: Float[Tensor, "N P 3"], c2w: Float[Tensor, "N 4 4"],
                    intrinsics: Float[Tensor, "N 3 3"]) -> tuple[Tensor, Tensor]:
    """World points -> (normalised pixel coordinates ``[N, P, 2]`` (u, v), depth ``[N, P]`` along the
    viewing direction); depth <= 0 means behind the camera (the pixel coordinates are then meaningless)."""
    R, t = c2w[:, :3, :3], c2w[:, :3, 3]
    cam = torch.einsum("npk,nkj->npj", points - t[:, None], R)  # R^T (X - t), OpenGL camera axes
    cv = torch.stack([cam[..., 0], -cam[..., 1], -cam[..., 2]], dim=-1)  # OpenCV axes: z is the depth
    depth = cv[..., 2]
    uvw = torch.einsum("nij,npj->npi", intrinsics, cv)
    safe = torch.where(depth.abs() > 1e-8, uvw[..., 2], torch.ones_like(depth))
    return uvw[..., :2] / safe[..., None], depth


def pixel_rays(c2w: Float[Tensor, "N 4 4"], intrinsics: Float[Tensor, "N 3 3"], height: int,
               width: int) -> tuple[Tensor, Tensor]:
    """Rays through the pixel centres of a ``height x width`` map: origins and unit directions,
    each ``[N, height * width, 3]`` in row-major pixel order."""
    N, dev, dt = c2w.shape[0], c2w.device, c2w.dtype
    v = (torch.arange(height, device=dev, dtype=dt) + 0.5) / height
    u = (torch.arange(width, device=dev, dtype=dt) + 0.5) / width
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    pix = torch.stack([uu.reshape(-1), vv.reshape(-1), torch.ones_like(uu).reshape(-1)], dim=-1)  # [P, 3]
    low = dt in (torch.float16, torch.bfloat16)  # no matrix inverse in half precision
    K_inv = torch.linalg.inv(intrinsics.float() if low else intrinsics).to(dt)
    cv = torch.einsum("nij,pj->npi", K_inv, pix)
    gl = torch.stack([cv[..., 0], -cv[..., 1], -cv[..., 2]], dim=-1)
    dirs = F.normalize(torch.einsum("nij,npj->npi", c2w[:, :3, :3], gl), dim=-1)
    origins = c2w[:, None, :3, 3].expand(N, height * width, 3)
    return origins, dirs


def orbit_angles(c2w: Float[Tensor, "N 4 4"]) -> tuple[Tensor, Tensor, Tensor]:
    """(elevation, azimuth, radius) of the camera centres, angles in radians (the world's orbit
    convention: azimuth 0 along +x, elevation up from the xy plane)."""
    pos = c2w[:, :3, 3]
    radius = pos.norm(dim=-1).clamp_min(1e-8)
    elevation = torch.asin((pos[:, 2] / radius).clamp(-1.0, 1.0))
    azimuth = torch.atan2(pos[:, 1], pos[:, 0])
    return elevation, azimuth, radius


def view_condition(c2w: Float[Tensor, "N 4 4"], intrinsics: Float[Tensor, "N 3 3"], intensity: Float[Tensor, "N"],
                   n_views: int) -> Float[Tensor, "N 9"]:
    """The condition vector of each view, ``[N, COND_DIM]``; views come in consecutive groups of ``n_views``.

    Entries: elevation relative to the group's first view (radians), sin and cos of the azimuth
    relative to it, the distance to the origin, the normalised focal lengths fx and fy, the
    principal point minus the image centre (cx - 0.5, cy - 0.5), and the image intensity (the mean
    brightness in [0, 1]) minus 0.5. Relative angles make the condition of a group the same
    wherever the group sits on the orbit; the first view of a group always reads (0, 0, 1).
    """
    N = c2w.shape[0]
    if n_views < 1 or N % n_views:
        raise ValueError(f"{N} views cannot be split into groups of n_views={n_views}")
    el, az, radius = orbit_angles(c2w.float())
    ref = torch.arange(0, N, n_views, device=c2w.device).repeat_interleave(n_views)
    d_el, d_az = el - el[ref], az - az[ref]
    K = intrinsics.float()
    out = torch.stack([d_el, torch.sin(d_az), torch.cos(d_az), radius, K[:, 0, 0], K[:, 1, 1], K[:, 0, 2] - 0.5,
                       K[:, 1, 2] - 0.5, intensity.float().reshape(N) - 0.5], dim=-1)
    return out.to(c2w.dtype)


def orbit_c2w(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Float[Tensor, "N 4 4"]:
    """Orbit cameras looking at the origin, up +z (lift3d's convention), ``[N, 4, 4]``."""
    from lift3d.utils.cameras import camera_positions, look_at_c2w

    return look_at_c2w(camera_positions(elevation_deg.float(), azimuth_deg.float(), distance.float()))


def fovy_of(intrinsics: Float[Tensor, "N 3 3"]) -> Tensor:
    """The vertical field of view in degrees of normalised intrinsics ``[N]``."""
    return torch.rad2deg(2 * torch.atan(0.5 / intrinsics[:, 1, 1]))


__all__ = ["COND_DIM", "intrinsics_from_fovy", "world_to_pixels", "pixel_rays", "orbit_angles", "view_condition",
           "orbit_c2w", "fovy_of"]
