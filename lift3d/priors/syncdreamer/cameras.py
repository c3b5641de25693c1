"""SyncDreamer's 16 output cameras: the model's own (OpenCV) matrices and the same cameras in lift3d's frame.

The released model draws its views from fixed cameras (the authors' ``meta_info/camera-16.pkl``):
elevation 30 degrees, azimuths 0, 22.5, ..., 337.5 degrees, distance 1.5, and one pinhole
intrinsic matrix for 256-pixel images, focal length 280 and principal point (128, 128), i.e. a
vertical field of view of 2 atan(128 / 280) = 49.13 degrees. The object sits in the cube
[-0.5, 0.5]^3 about the origin. Azimuth 0 is the input view's azimuth; the input's elevation is
the user's (any value; the views' elevation is 30 regardless).

Their world frame is lift3d's: +z up, and the camera at azimuth a, elevation e is at
1.5 (cos e cos a, cos e sin a, sin e) looking at the origin, its image x axis pointing along
+y at azimuth 0 (the right of a viewer facing the object's front). So the table converts without
any axis change: azimuth 0 (+x) is the front, i.e. the input view, as lift3d's convention wants.
:func:`opencv_w2c` writes the matrices in SyncDreamer's form (world -> camera, x right, y down,
z forward), which the network uses to unproject features, and the tests compare both forms.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

N_VIEWS = 16
ELEVATION = 30.0
AZIMUTHS = tuple(22.5 * i for i in range(N_VIEWS))
DISTANCE = 1.5
IMAGE_SIZE = 256
FOCAL = 280.0
FOVY = math.degrees(2.0 * math.atan((IMAGE_SIZE / 2) / FOCAL))


def intrinsics(image_size: int = IMAGE_SIZE, n: int = N_VIEWS) -> Float[Tensor, "N 3 3"]:
    """The views' pinhole matrix for ``image_size`` pixels (the released one scaled), repeated ``n`` times."""
    s = image_size / IMAGE_SIZE
    K = torch.tensor([[FOCAL * s, 0.0, IMAGE_SIZE / 2 * s], [0.0, FOCAL * s, IMAGE_SIZE / 2 * s], [0.0, 0.0, 1.0]])
    return K.expand(n, 3, 3).clone()


def positions(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor | float) -> Float[Tensor, "N 3"]:
    """lift3d's camera positions: r (cos e cos a, cos e sin a, sin e)."""
    e, a = torch.deg2rad(elevation_deg.double()), torch.deg2rad(azimuth_deg.double())
    r = torch.as_tensor(distance, dtype=torch.float64)
    return torch.stack([r * e.cos() * a.cos(), r * e.cos() * a.sin(), r * e.sin()], -1)


def opencv_w2c(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor | float) -> Float[Tensor, "N 3 4"]:
    """World -> camera [R | t] (x right, y down, z forward) of cameras looking at the origin with +z up."""
    c = positions(elevation_deg, azimuth_deg, distance)
    forward = -c / c.norm(dim=-1, keepdim=True)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(forward)
    right = torch.linalg.cross(forward, up)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right)
    R = torch.stack([right, down, forward], -2)  # rows: the camera axes in world coordinates
    t = -(R @ c[..., None])
    return torch.cat([R, t], -1).float()


def view_table(distance: Optional[float] = None) -> dict[str, Float[Tensor, "16"]]:
    """``elevation``, ``azimuth`` (wrapped into [-180, 180)), ``distance``, ``fovy`` of the 16 views in
    lift3d's convention (degrees); ``distance`` rescales the scene (default the model's 1.5)."""
    az = torch.tensor(AZIMUTHS, dtype=torch.float32)
    az = torch.remainder(az + 180.0, 360.0) - 180.0
    return {"elevation": torch.full((N_VIEWS,), ELEVATION), "azimuth": az,
            "distance": torch.full((N_VIEWS,), float(DISTANCE if distance is None else distance)),
            "fovy": torch.full((N_VIEWS,), FOVY)}


def model_cameras(image_size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """(K [16, 3, 3], world -> camera [16, 3, 4]) as the network uses them."""
    az = torch.tensor(AZIMUTHS)
    return intrinsics(image_size), opencv_w2c(torch.full_like(az, ELEVATION), az, DISTANCE)


def view_embedding(input_elevation_deg: Tensor) -> Float[Tensor, "B 16 4"]:
    """The relative camera of each view as the network reads it: (d_elevation, sin d_azimuth, cos d_azimuth, 0),
    with Zero123's sign convention (elevations negated: d = (-30) - (-input)), in radians."""
    e_in = -torch.deg2rad(input_elevation_deg.float().reshape(-1))  # [B]
    e_out = -math.radians(ELEVATION)
    d_e = (e_out - e_in)[:, None].expand(-1, N_VIEWS)
    d_a = torch.deg2rad(torch.tensor(AZIMUTHS, device=d_e.device))[None].expand_as(d_e)
    return torch.stack([d_e, d_a.sin(), d_a.cos(), torch.zeros_like(d_e)], -1)


__all__ = ["N_VIEWS", "ELEVATION", "AZIMUTHS", "DISTANCE", "IMAGE_SIZE", "FOCAL", "FOVY", "intrinsics", "positions",
           "opencv_w2c", "view_table", "model_cameras", "view_embedding"]
