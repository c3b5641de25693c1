"""lift3d's cameras as MVDream's camera MLP reads them.

MVDream (Shi et al. 2023) conditions each view on its camera-to-world matrix, the camera placed on
the unit sphere and the 4x4 matrix flattened row by row to 16 numbers. The matrices it was trained
on come from its ``camera_utils``; this module says how lift3d's relate to them.

Derivation. MVDream builds a camera at elevation ``e`` and azimuth ``a`` in a y-up frame: position
``p = (cos e sin a, sin e, cos e cos a)``, looking at the origin with world up +y, columns
(right, up, back, position) with ``back = p / |p|``, ``right = -back x up`` normalised,
``up' = right x -back``: OpenGL camera axes. It then turns the whole matrix into a z-up frame
(its "Blender" convention) by left-multiplying the rotation ``R: (x, y, z) -> (x, -z, y)``. In that
frame the camera sits at ``R p = (cos e sin a, -cos e cos a, sin e)``, with world up ``R (0, 1, 0) = +z``.

lift3d (``lift3d.utils.cameras``) puts a camera at elevation ``e`` and azimuth ``b`` at
``(cos e cos b, cos e sin b, sin e)``, looking at the origin, world up +z, with the same OpenGL
columns built by the same cross products. The two positions agree when ``cos b = sin a`` and
``sin b = -cos a``, that is when ``b = a - 90``. A rotation preserves cross products, so once
the positions and the world up agree, right, up and back agree too: the whole matrices are equal.

So the change of world is the identity (:data:`LIFT3D_TO_MVDREAM`), and only the azimuth's zero
differs: lift3d's azimuth ``b`` is MVDream's ``b + 90``. lift3d's front (azimuth 0, +x) is
MVDream's azimuth 90, and MVDream's azimuth 0 (camera on -y) is lift3d's -90. This is also what
MVDream's own threestudio guidance does: it feeds threestudio's c2w (threestudio's world and
lift3d's are the same) to the model unchanged. Only the translation is normalised, as MVDream's
``normalize_camera`` does: the model never saw camera distance.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

#: lift3d's world -> MVDream's z-up world, homogeneous (the identity: see the module docstring).
LIFT3D_TO_MVDREAM = torch.eye(4)

#: Width of the camera condition: a flattened 4x4 matrix.
CAMERA_DIM = 16


def mvdream_azimuth(azimuth_deg: Tensor) -> Tensor:
    """MVDream's azimuth (degrees, in [-180, 180)) of a camera at lift3d azimuth ``azimuth_deg``."""
    return torch.remainder(torch.as_tensor(azimuth_deg) + 90.0 + 180.0, 360.0) - 180.0


def mvdream_camera(c2w: Float[Tensor, "B 4 4"]) -> Float[Tensor, "B 16"]:
    """lift3d camera-to-world matrices -> MVDream's camera condition.

    The matrices are expressed in MVDream's world (:data:`LIFT3D_TO_MVDREAM`), the camera position
    scaled onto the unit sphere, and each matrix flattened row-major, as MVDream's training data and
    its ``normalize_camera`` lay them out.
    """
    if c2w.dim() != 3 or tuple(c2w.shape[1:]) != (4, 4):
        raise ValueError(f"expected camera-to-world matrices [B, 4, 4], got {tuple(c2w.shape)}")
    cams = LIFT3D_TO_MVDREAM.to(c2w) @ c2w
    position = cams[:, :3, 3]
    unit = position / (position.norm(dim=-1, keepdim=True) + 1e-8)
    cams = torch.cat([torch.cat([cams[:, :3, :3], unit[:, :, None]], dim=2), cams[:, 3:, :]], dim=1)
    return cams.reshape(c2w.shape[0], CAMERA_DIM)


__all__ = ["LIFT3D_TO_MVDREAM", "CAMERA_DIM", "mvdream_azimuth", "mvdream_camera"]
