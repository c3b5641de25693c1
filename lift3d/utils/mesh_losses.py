"""Mesh regularizers for the refinement stages (Magic3D, Fantasia3D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.utils.mesh import Mesh


def _edge_faces(t_pos_idx: Tensor) -> Tensor:
    """[E, 2] pairs of face indices sharing an (undirected) edge."""
    Fn = t_pos_idx.shape[0]
    edges = torch.cat([t_pos_idx[:, [0, 1]], t_pos_idx[:, [1, 2]], t_pos_idx[:, [2, 0]]], dim=0)  # [3F, 2]
    edges = torch.sort(edges, dim=-1).values
    face = torch.arange(Fn, device=t_pos_idx.device).repeat(3)
    key = edges[:, 0] * (int(t_pos_idx.max()) + 1) + edges[:, 1]
    order = torch.argsort(key)
    key, face = key[order], face[order]
    same = key[1:] == key[:-1]
    return torch.stack([face[:-1][same], face[1:][same]], dim=-1)


def normal_consistency(mesh: Mesh) -> Tensor:
    """Mean (1 - cos) between the normals of faces that share an edge."""
    pairs = _edge_faces(mesh.t_pos_idx)
    if pairs.numel() == 0:
        return mesh.v_pos.sum() * 0.0
    v = mesh.v_pos[mesh.t_pos_idx]
    n = F.normalize(torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1), dim=-1, eps=1e-12)
    return (1.0 - (n[pairs[:, 0]] * n[pairs[:, 1]]).sum(-1)).mean()


def laplacian_smoothness(mesh: Mesh) -> Tensor:
    """Mean squared distance of each vertex from the mean of its neighbours (uniform weights)."""
    f = mesh.t_pos_idx
    V = mesh.n_vertices
    src = torch.cat([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    dst = torch.cat([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    nb_sum = torch.zeros_like(mesh.v_pos).index_add(0, src, mesh.v_pos[dst])
    deg = torch.zeros(V, device=f.device, dtype=mesh.v_pos.dtype).index_add(0, src, torch.ones_like(src, dtype=mesh.v_pos.dtype))
    lap = mesh.v_pos - nb_sum / deg.clamp(min=1)[:, None]
    return (lap**2).sum(-1).mean()
