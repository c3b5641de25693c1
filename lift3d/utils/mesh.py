"""A triangle mesh as tensors, passed between geometry, rasterizer and exporters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Mesh:
    """Triangles in the world frame (+z up).

    v_pos [V, 3] float; t_pos_idx [F, 3] long. Optional: v_tex [T, 2] UVs in [0, 1] with
    t_tex_idx [F, 3]; extras holds per-vertex attributes (e.g. ``"v_rgb"`` [V, 3]).
    """

    v_pos: Tensor
    t_pos_idx: Tensor
    v_tex: Tensor | None = None
    t_tex_idx: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.v_pos.ndim != 2 or self.v_pos.shape[-1] != 3:
            raise ValueError(f"Mesh.v_pos must be [V, 3], got {tuple(self.v_pos.shape)}")
        if self.t_pos_idx.ndim != 2 or self.t_pos_idx.shape[-1] != 3:
            raise ValueError(f"Mesh.t_pos_idx must be [F, 3], got {tuple(self.t_pos_idx.shape)}")

    @property
    def n_vertices(self) -> int:
        return self.v_pos.shape[0]

    @property
    def n_faces(self) -> int:
        return self.t_pos_idx.shape[0]

    def face_normals(self) -> Tensor:
        """[F, 3] unit normals (counter-clockwise winding faces outward)."""
        v = self.v_pos[self.t_pos_idx]
        return F.normalize(torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1), dim=-1)

    def vertex_normals(self) -> Tensor:
        """[V, 3] area-weighted vertex normals."""
        v = self.v_pos[self.t_pos_idx]
        fn = torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1)  # area-weighted
        vn = torch.zeros_like(self.v_pos)
        for k in range(3):
            vn = vn.index_add(0, self.t_pos_idx[:, k], fn)
        return F.normalize(vn, dim=-1, eps=1e-12)

    def to(self, device: torch.device | str) -> "Mesh":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Mesh(mv(self.v_pos), mv(self.t_pos_idx), mv(self.v_tex), mv(self.t_tex_idx),
                    {k: v.to(device) for k, v in self.extras.items()})
