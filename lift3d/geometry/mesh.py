"""A fixed triangle mesh loaded from a file, with a learnable feature field for texturing.

For texture-only recipes (e.g. TEXTure / Fantasia3D's appearance stage on a given shape): the
mesh is read once with trimesh (OBJ, PLY, GLB/glTF, STL, ...), optionally centred and scaled into
the scene radius and converted to lift3d's +z up frame, and never changes; only the feature field
(the same dense multiresolution grid + MLP as DMTet's) is optimised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lift3d.geometry.base import BaseGeometry
from lift3d.geometry.tetrahedra_sdf_grid import FeatureFieldConfig, FeatureFieldGeometry, build_feature_field
from lift3d.registry import register
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


@register("mesh")
class MeshGeometry(FeatureFieldGeometry):
    """A fixed mesh from ``mesh_path``; ``isosurface()`` returns it, features come from a grid field."""

    @dataclass
    class Config(BaseGeometry.Config, FeatureFieldConfig):
        mesh_path: str = ""
        """Mesh file to load (OBJ, PLY, GLB/glTF, STL, ... anything trimesh reads)."""
        normalize: bool = True
        """Centre the bounding box at the origin and scale its largest half-extent to ``normalize_scale * radius``."""
        normalize_scale: float = 0.9
        """Fraction of ``radius`` the normalised mesh fills."""
        up_axis: Literal["auto", "+z", "+y"] = "auto"
        """Up axis of the file: ``auto`` = +y for GLB/glTF (glTF's convention), +z for everything else."""

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        if not self.cfg.mesh_path:
            raise ValueError("geometry 'mesh' needs mesh_path (a mesh file trimesh can read)")
        mesh = load_mesh_file(self.cfg.mesh_path, self.cfg.normalize, self.cfg.radius, self.cfg.normalize_scale,
                              self.cfg.up_axis)
        self.register_buffer("v_pos", mesh.v_pos, persistent=False)  # [V, 3]
        self.register_buffer("t_pos_idx", mesh.t_pos_idx, persistent=False)  # [F, 3]
        self._loaded = mesh
        self.feature_field = build_feature_field(self.cfg)

    def isosurface(self) -> Mesh:
        m = self._loaded
        extras = {k: t.to(self.v_pos.device) for k, t in m.extras.items()}
        v_tex = None if m.v_tex is None else m.v_tex.to(self.v_pos.device)
        t_tex = None if m.t_tex_idx is None else m.t_tex_idx.to(self.v_pos.device)
        return Mesh(self.v_pos, self.t_pos_idx, v_tex, t_tex, extras)

