"""Zero123++'s fixed output cameras, in lift3d's world frame, and the 3x2 grid its views come tiled in.

Zero123++ (Shi et al. 2023) draws six views of the object in one image, 2 views wide and 3 tall,
row by row: view k (k = 0..5) sits in row k // 2, column k % 2. The cameras are fixed by the
model (the sudo-ai/zero123plus README, "Camera Parameters"):

* azimuths 30, 90, 150, 210, 270, 330 degrees, relative to the input view;
* elevations alternate, absolute: 30 / -20 (v1.1), 20 / -10 (v1.2);
* field of view 30 degrees for v1.2. v1.1 publishes none (its views follow the input's framing),
  so a v1.1 table has no field of view and a caller must supply one.

lift3d puts a camera at r (cos e cos a, cos e sin a, sin e), +z up, looking at the origin, with
azimuth 0 (+x) the front. The input view is azimuth 0, so a Zero123++ azimuth is used unchanged:
the same spherical formula and +z-up look-at frame that InstantMesh uses to reconstruct these
views (its ``get_zero123plus_input_cameras``, radius 4 and 30 degrees for v1.2), which is where the
default distance of 4 comes from. The object scale is arbitrary; only distance / object size matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

#: Rows and columns of the tiled output image.
GRID_ROWS, GRID_COLS = 3, 2
N_VIEWS = GRID_ROWS * GRID_COLS
AZIMUTHS = (30.0, 90.0, 150.0, 210.0, 270.0, 330.0)


@dataclass(frozen=True)
class PoseTable:
    """The cameras of one model version's views."""

    version: str
    elevations: tuple[float, ...]
    azimuths: tuple[float, ...] = AZIMUTHS
    fovy_deg: Optional[float] = None
    """Vertical field of view of the views, degrees; None where the model does not fix one."""
    distance: float = 4.0
    """Camera distance the table is placed at (a scale choice: InstantMesh's 4 with 30 degrees)."""


POSE_TABLES: dict[str, PoseTable] = {
    "v1.1": PoseTable("v1.1", (30.0, -20.0) * 3, fovy_deg=None),
    "v1.2": PoseTable("v1.2", (20.0, -10.0) * 3, fovy_deg=30.0),
}


def pose_table(version: str) -> PoseTable:
    if version not in POSE_TABLES:
        raise ValueError(f"unknown Zero123++ version {version!r}; valid: {', '.join(POSE_TABLES)}")
    return POSE_TABLES[version]


def view_cameras(version: str, distance: Optional[float] = None, fovy_deg: Optional[float] = None
                 ) -> dict[str, Float[Tensor, "6"]]:
    """``elevation``, ``azimuth`` (degrees, azimuths wrapped into [-180, 180)), ``distance`` and ``fovy``
    of the six views of ``version``; ``distance`` / ``fovy_deg`` override the table's."""
    table = pose_table(version)
    fov = table.fovy_deg if fovy_deg is None else float(fovy_deg)
    if fov is None:
        raise ValueError(f"Zero123++ {version} fixes no field of view for its views (they follow the input's "
                         "framing): give one explicitly (the field of view of your input image)")
    az = torch.tensor(table.azimuths, dtype=torch.float32)
    az = torch.remainder(az + 180.0, 360.0) - 180.0
    n = len(table.azimuths)
    return {"elevation": torch.tensor(table.elevations, dtype=torch.float32), "azimuth": az,
            "distance": torch.full((n,), float(table.distance if distance is None else distance)),
            "fovy": torch.full((n,), fov)}


# ---------------------------------------------------------------------------------------------
# The grid


def untile(grid: Float[Tensor, "... C H W"], rows: int = GRID_ROWS, cols: int = GRID_COLS
           ) -> Float[Tensor, "... N C h w"]:
    """Split a tiled image (channels first) into its ``rows * cols`` views, row by row."""
    *lead, C, H, W = grid.shape
    if H % rows or W % cols:
        raise ValueError(f"a {H}x{W} image does not split into {rows}x{cols} equal views")
    h, w = H // rows, W // cols
    x = grid.reshape(*lead, C, rows, h, cols, w)
    nd = len(lead)
    # [..., C, r, h, c, w] -> [..., r, c, C, h, w]
    x = x.permute(*range(nd), nd + 1, nd + 3, nd, nd + 2, nd + 4)
    return x.reshape(*lead, rows * cols, C, h, w)


def tile(views: Float[Tensor, "... N C h w"], rows: int = GRID_ROWS, cols: int = GRID_COLS
         ) -> Float[Tensor, "... C H W"]:
    """The inverse of :func:`untile`: ``rows * cols`` views into one image, row by row."""
    *lead, N, C, h, w = views.shape
    if N != rows * cols:
        raise ValueError(f"{N} views do not fill a {rows}x{cols} grid")
    nd = len(lead)
    x = views.reshape(*lead, rows, cols, C, h, w)
    # [..., r, c, C, h, w] -> [..., C, r, h, c, w]
    x = x.permute(*range(nd), nd + 2, nd, nd + 3, nd + 1, nd + 4)
    return x.reshape(*lead, C, rows * h, cols * w)


__all__ = ["PoseTable", "POSE_TABLES", "pose_table", "view_cameras", "tile", "untile", "GRID_ROWS", "GRID_COLS",
           "N_VIEWS", "AZIMUTHS"]
