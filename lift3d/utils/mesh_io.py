"""Reading triangle mesh files into lift3d's frame (+z up), for any geometry that starts from one.

The fixed-mesh geometry (``mesh_path``) and DMTet's ``shape_init: mesh:PATH`` both read files
here; trimesh does the parsing (OBJ, PLY, GLB/glTF, STL, ...). The writers are in
:mod:`lift3d.exporters.formats`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lift3d.utils.mesh import Mesh

_Y_UP_SUFFIXES = (".glb", ".gltf")


def load_mesh_file(path: str | Path, normalize: bool = True, radius: float = 1.0, scale: float = 0.9,
                   up_axis: str = "auto") -> Mesh:
    """Read a triangle mesh into lift3d's frame.

    ``up_axis``: "+z" keeps coordinates, "+y" rotates y-up data to z-up ((x, y, z) -> (x, -z, y)),
    "auto" is "+y" for GLB/glTF (glTF is y-up by specification) and "+z" otherwise. With
    ``normalize`` the bounding box is centred at the origin and its largest half-extent scaled to
    ``scale * radius``. UVs and vertex colours are kept when the file has them.
    """
    import trimesh

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"mesh file {str(p)!r} does not exist (resolved to {p.resolve()})")
    if up_axis not in ("auto", "+z", "+y"):
        raise ValueError(f"up_axis must be 'auto', '+z' or '+y', got {up_axis!r}")
    try:
        tm = trimesh.load(str(p), force="mesh", process=False)
    except Exception as exc:
        raise ValueError(f"cannot read mesh file {str(p)!r}: {exc}") from exc
    faces = np.asarray(getattr(tm, "faces", np.zeros((0, 3))))
    if faces.ndim != 2 or len(faces) == 0:
        raise ValueError(f"mesh file {str(p)!r} has no triangle faces (a point cloud or an empty scene?)")
    v = torch.tensor(np.asarray(tm.vertices), dtype=torch.float32)
    if up_axis == "+y" or (up_axis == "auto" and p.suffix.lower() in _Y_UP_SUFFIXES):
        v = torch.stack([v[:, 0], -v[:, 2], v[:, 1]], -1)
    if normalize:
        lo, hi = v.amin(0), v.amax(0)
        half = float((hi - lo).max()) / 2
        if half <= 0:
            raise ValueError(f"mesh file {str(p)!r} is degenerate (all vertices at one point)")
        v = (v - (lo + hi) / 2) * (scale * radius / half)
    f = torch.tensor(faces, dtype=torch.long)
    mesh = Mesh(v, f)
    uv = getattr(getattr(tm, "visual", None), "uv", None)
    if uv is not None and len(uv) == len(v):
        mesh.v_tex = torch.tensor(np.asarray(uv), dtype=torch.float32)
        mesh.t_tex_idx = f.clone()
    colors = getattr(getattr(tm, "visual", None), "vertex_colors", None)
    if getattr(tm.visual, "kind", None) == "vertex" and colors is not None and len(colors) == len(v):
        mesh.extras["v_rgb"] = torch.tensor(np.asarray(colors)[:, :3], dtype=torch.float32) / 255.0
    return mesh


__all__ = ["load_mesh_file"]
