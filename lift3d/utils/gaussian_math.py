"""Maths of 3D Gaussians shared by the geometry, its densification strategy and the splatting renderer.

Real spherical harmonics up to degree 3 with the constants and sign convention of the reference
3DGS code (Kerbl et al., SIGGRAPH 2023; colour ``rgb = 0.5 + SH(dir)``), quaternion to rotation
matrix, and the covariance ``R S S^T R^T`` of a Gaussian. It lives in ``utils`` so that the
geometry and the renderer both read it without importing each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def num_sh_bases(degree: int) -> int:
    """Coefficients per colour channel for SH up to ``degree`` (0..3)."""
    return (degree + 1) ** 2


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """Degree-0 coefficient giving colour ``rgb`` under the 3DGS convention ``rgb = 0.5 + C0 * dc``."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(dc: Tensor) -> Tensor:
    return dc * SH_C0 + 0.5


def eval_sh(degree: int, sh: Tensor, dirs: Tensor) -> Tensor:
    """Real spherical harmonics up to ``degree``: sh [..., K, C] (K >= (degree+1)^2), dirs [..., 3] unit -> [..., C]."""
    out = SH_C0 * sh[..., 0, :]
    if degree < 1:
        return out
    x, y, z = dirs[..., 0:1], dirs[..., 1:2], dirs[..., 2:3]
    out = out - SH_C1 * y * sh[..., 1, :] + SH_C1 * z * sh[..., 2, :] - SH_C1 * x * sh[..., 3, :]
    if degree < 2:
        return out
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    out = (
        out
        + SH_C2[0] * xy * sh[..., 4, :]
        + SH_C2[1] * yz * sh[..., 5, :]
        + SH_C2[2] * (2.0 * zz - xx - yy) * sh[..., 6, :]
        + SH_C2[3] * xz * sh[..., 7, :]
        + SH_C2[4] * (xx - yy) * sh[..., 8, :]
    )
    if degree < 3:
        return out
    return (
        out
        + SH_C3[0] * y * (3 * xx - yy) * sh[..., 9, :]
        + SH_C3[1] * xy * z * sh[..., 10, :]
        + SH_C3[2] * y * (4 * zz - xx - yy) * sh[..., 11, :]
        + SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * sh[..., 12, :]
        + SH_C3[4] * x * (4 * zz - xx - yy) * sh[..., 13, :]
        + SH_C3[5] * z * (xx - yy) * sh[..., 14, :]
        + SH_C3[6] * x * (xx - 3 * yy) * sh[..., 15, :]
    )


def quat_to_rotmat(q: Tensor) -> Tensor:
    """Quaternions [..., 4] (w, x, y, z; need not be unit) -> rotation matrices [..., 3, 3]."""
    q = F.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """Sigma = R S S^T R^T: quats [N, 4] (wxyz), scales [N, 3] (activated, > 0) -> [N, 3, 3]."""
    M = quat_to_rotmat(quats) * scales[..., None, :]  # R @ diag(s)
    return M @ M.transpose(-1, -2)


def inverse_sigmoid(x: Tensor) -> Tensor:
    return torch.log(x / (1 - x))


__all__ = [
    "SH_C0",
    "SH_C1",
    "SH_C2",
    "SH_C3",
    "num_sh_bases",
    "rgb_to_sh",
    "sh_to_rgb",
    "eval_sh",
    "quat_to_rotmat",
    "covariance_3d",
    "inverse_sigmoid",
]
