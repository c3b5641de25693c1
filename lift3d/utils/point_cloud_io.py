"""Plain coloured point clouds as PLY files: float ``x y z`` and uchar ``red green blue`` per vertex.

This is the layout every point-cloud viewer (MeshLab, CloudCompare, Open3D, Blender) reads, and the one a
Point-E sample is written in (``python -m lift3d.priors.point_e sample``). Coordinates are stored in our world
frame (right-handed, +z up, front at +x) unchanged; a producer with another frame converts before writing.

Reading accepts any PLY with ``x y z`` vertices (ascii or binary, any scalar types, via
:func:`lift3d.utils.gaussian_ply.read_ply_vertices`); colours are taken from ``red green blue`` (integers are
divided by 255, floats used as they are), and default to mid grey when the file has none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lift3d.utils.gaussian_ply import read_ply_vertices

__all__ = ["write_point_cloud_ply", "read_point_cloud_ply"]


def write_point_cloud_ply(path: str | Path, xyz, rgb=None) -> Path:
    """Write a binary little-endian PLY point cloud.

    Args:
        path: the file to write (parent folders are created).
        xyz: [N, 3] positions (numpy array, torch tensor or nested lists).
        rgb: [N, 3] colours in [0, 1] (floats; clipped, rounded to uchar), or None for mid grey.

    Returns:
        The path written.
    """
    xyz = _as_numpy(xyz).astype(np.float32)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"write_point_cloud_ply: xyz must be [N, 3], got shape {tuple(xyz.shape)}")
    n = xyz.shape[0]
    if not np.isfinite(xyz).all():
        raise ValueError("write_point_cloud_ply: xyz holds NaN or infinite values")
    if rgb is None:
        rgb = np.full((n, 3), 0.5, np.float32)
    rgb = _as_numpy(rgb).astype(np.float32)
    if rgb.shape != (n, 3):
        raise ValueError(f"write_point_cloud_ply: rgb must be [{n}, 3] like xyz, got shape {tuple(rgb.shape)}")
    rgb8 = np.round(np.clip(np.nan_to_num(rgb, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)

    dt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    data = np.empty(n, dtype=dt)
    data["x"], data["y"], data["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    data["red"], data["green"], data["blue"] = rgb8[:, 0], rgb8[:, 1], rgb8[:, 2]
    header = [
        "ply", "format binary_little_endian 1.0", f"element vertex {n}",
        "property float x", "property float y", "property float z",
        "property uchar red", "property uchar green", "property uchar blue",
        "end_header",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(data.tobytes())
    return path


def read_point_cloud_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a PLY point cloud: (xyz [N, 3] float32, rgb [N, 3] float32 in [0, 1]).

    Colours come from ``red green blue`` (integer types / 255; float types as stored, clipped to [0, 1]);
    a file without them gets mid grey (0.5).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"point cloud PLY not found: {path}")
    v = read_ply_vertices(path)
    missing = [k for k in ("x", "y", "z") if k not in v]
    if missing:
        raise ValueError(f"{path} has no point positions: vertex element lacks {', '.join(missing)} "
                         f"(has {', '.join(v) or 'nothing'})")
    xyz = np.stack([v["x"], v["y"], v["z"]], axis=-1).astype(np.float32)
    if all(k in v for k in ("red", "green", "blue")):
        cols = []
        for k in ("red", "green", "blue"):
            c = v[k]
            if np.issubdtype(c.dtype, np.integer):
                cols.append(c.astype(np.float32) / 255.0)
            else:
                cols.append(np.clip(c.astype(np.float32), 0.0, 1.0))
        rgb = np.stack(cols, axis=-1)
    else:
        rgb = np.full_like(xyz, 0.5)
    return xyz, rgb


def _as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().float().numpy()
    return np.asarray(a)
