"""A fixed triangle mesh with a learnable appearance: a 3D feature field or a UV texture.

For texture-only recipes (TEXTure, Fantasia3D's appearance stage on a given shape) and for the
second stage of DreamGaussian (Tang et al., ICLR 2024, "DreamGaussian: Generative Gaussian
Splatting for Efficient 3D Content Creation"): the mesh is read with trimesh (OBJ, PLY, GLB/glTF,
STL, ...), optionally centred and scaled into the scene radius and converted to lift3d's +z up
frame, or extracted from another geometry by ``create_from`` (marching cubes on Gaussians, a
NeRF's density, DMTet), and never changes. Only the appearance is optimised: the feature field
(the same dense multiresolution grid + MLP as DMTet's), or, with ``texture: uv``, an image over
an xatlas unwrap initialised by baking the source geometry's colours, as DreamGaussian refines.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
from torch import Tensor

from lift3d.config import parse_structured
from lift3d.geometry.base import BaseGeometry
from lift3d.geometry.feature_field import (FeatureFieldConfig, FeatureFieldGeometry, build_feature_field,
                                          fit_features)
from lift3d.registry import register
from lift3d.utils.mesh import Mesh
from lift3d.utils.mesh_io import load_mesh_file
from lift3d.utils.rasterize_ops import texture as tex_op
from lift3d.utils.uv import bake_texture, unwrap_uv


@register("mesh")
class MeshGeometry(FeatureFieldGeometry):
    """A fixed triangle mesh; ``isosurface()`` returns it, features come from a grid field or a UV texture.

    The mesh comes from ``mesh_path``, or from another geometry through :meth:`create_from` (a stage
    switch, e.g. DreamGaussian's Gaussians -> mesh), or from a checkpoint: vertices, faces and UVs
    are buffers of the state dict, so a fresh instance built from the config alone (no file, no
    source geometry) is rebuilt by ``load_state_dict``.

    Appearance (``texture``): ``field`` queries the feature field at surface points; ``uv`` holds a
    learnable image ``texture`` [T, T, C] in image layout (row 0 is the top, v = 1, as the exporter
    writes PNGs) sampled bilinearly at the texture coordinates the rasterizer interpolates.
    """

    @dataclass
    class Config(BaseGeometry.Config, FeatureFieldConfig):
        mesh_path: str = ""
        """Mesh file to load (OBJ, PLY, GLB/glTF, STL, ... anything trimesh reads). May be empty when the mesh comes
        from ``create_from`` (a stage switch) or from a checkpoint."""
        normalize: bool = True
        """Centre the bounding box at the origin and scale its largest half-extent to ``normalize_scale * radius``."""
        normalize_scale: float = 0.9
        """Fraction of ``radius`` the normalised mesh fills."""
        up_axis: Literal["auto", "+z", "+y"] = "auto"
        """Up axis of the file: ``auto`` = +y for GLB/glTF (glTF's convention), +z for everything else."""
        texture: Literal["field", "uv"] = "field"
        """Appearance: ``field`` (a 3D feature field queried at surface points) or ``uv`` (a learnable UV texture
        image; the mesh is unwrapped with xatlas unless it already has UVs)."""
        texture_size: int = 512
        """Side of the UV texture in texels (``texture: uv``)."""
        texture_pad_pixels: int = 4
        """Seam padding of the texture baked by ``create_from``: texels the charts are grown by."""
        uv_padding: int = 2
        """Gap xatlas leaves around each chart, in texels."""
        xatlas_chart_options: dict[str, Any] = field(default_factory=dict)
        """Fields of xatlas's ChartOptions (e.g. ``{max_chart_area: 0.05}``; see the mesh exporter)."""
        unwrap_timeout: Optional[float] = None
        """Seconds the xatlas child process may run; null = no limit."""
        feature_fit_steps: int = 300
        """``texture: field``: Adam steps ``create_from`` spends distilling the source geometry's features."""

    cfg: Config
    #: Tells the rasterizer to pass ``uv`` (interpolated texture coordinates) to ``export_attributes``.
    samples_uv: bool = False

    def configure(self, init_mesh: Mesh | None = None, **kwargs: Any) -> None:
        super().configure(**kwargs)
        if self.cfg.texture_size < 2:
            raise ValueError(f"geometry 'mesh': texture_size must be >= 2, got {self.cfg.texture_size}")
        mesh = init_mesh
        if mesh is None and self.cfg.mesh_path:
            mesh = load_mesh_file(self.cfg.mesh_path, self.cfg.normalize, self.cfg.radius, self.cfg.normalize_scale,
                                  self.cfg.up_axis)
        if mesh is not None and self.cfg.texture == "uv" and mesh.v_tex is None:
            mesh = unwrap_uv(mesh, texture_size=self.cfg.texture_size, padding=self.cfg.uv_padding,
                             chart_options=self.cfg.xatlas_chart_options, timeout=self.cfg.unwrap_timeout)
        # Persistent buffers: the mesh travels in checkpoints (stage switches have no file to reload).
        # Empty until a mesh arrives from a file, create_from or load_state_dict.
        self.register_buffer("v_pos", torch.zeros(0, 3))  # [V, 3]
        self.register_buffer("t_pos_idx", torch.zeros(0, 3, dtype=torch.long))  # [F, 3]
        self.register_buffer("v_tex", torch.zeros(0, 2))  # [T, 2], empty when the mesh has no UVs
        self.register_buffer("t_tex_idx", torch.zeros(0, 3, dtype=torch.long))  # [F, 3]
        self._extras: dict[str, Tensor] = {}
        self._from_file = mesh is not None and init_mesh is None
        if mesh is not None:
            self.set_mesh(mesh)
        if self.cfg.texture == "uv":
            self.samples_uv = True
            self.feature_field = None
            T, C = self.cfg.texture_size, self.cfg.n_feature_dims
            self.texture = nn.Parameter(torch.zeros(T, T, C))  # [T, T, C], image layout (row 0: v = 1)
        else:
            self.feature_field = build_feature_field(self.cfg)

    def set_mesh(self, mesh: Mesh) -> None:
        """Replace the stored mesh (positions, faces and, when present, UVs)."""
        dev = self.v_pos.device
        self.v_pos = mesh.v_pos.detach().float().to(dev).contiguous()
        self.t_pos_idx = mesh.t_pos_idx.detach().long().to(dev).contiguous()
        has_uv = mesh.v_tex is not None and mesh.t_tex_idx is not None
        self.v_tex = mesh.v_tex.detach().float().to(dev).contiguous() if has_uv else torch.zeros(0, 2, device=dev)
        self.t_tex_idx = (mesh.t_tex_idx.detach().long().to(dev).contiguous() if has_uv
                          else torch.zeros(0, 3, dtype=torch.long, device=dev))
        self._extras = {k: t.detach() for k, t in mesh.extras.items()}

    def isosurface(self) -> Mesh:
        if self.t_pos_idx.shape[0] == 0:
            raise ValueError(
                "geometry 'mesh' has no mesh: set mesh_path (a mesh file trimesh can read), create it from another "
                "geometry (a stage switch: MeshGeometry.create_from), or load a checkpoint"
            )
        has_uv = self.t_tex_idx.shape[0] == self.t_pos_idx.shape[0]
        V = self.v_pos.shape[0]
        extras = {k: t.to(self.v_pos.device) for k, t in self._extras.items() if t.shape[:1] == (V,)}
        return Mesh(self.v_pos, self.t_pos_idx, self.v_tex if has_uv else None, self.t_tex_idx if has_uv else None,
                    extras)

    # ------------------------------------------------------------------ appearance

    def export_attributes(self, points: Tensor, uv: Tensor | None = None) -> dict[str, Tensor]:
        """``features`` [N, C] at surface points [N, 3]. With a UV texture, sampled at ``uv`` [N, 2] (OBJ convention,
        v up); without ``uv`` (baking, vertex colours, conversions) at the UV of the nearest mesh vertex."""
        if self.feature_field is not None:
            return {"features": self.feature_field(points)}
        if uv is None:
            uv = self._nearest_vertex_uv(points)
        return {"features": sample_uv_texture(self.texture, uv.to(self.texture.dtype))}

    @torch.no_grad()
    def _nearest_vertex_uv(self, points: Tensor) -> Tensor:
        from scipy.spatial import cKDTree

        mesh = self.isosurface()
        if mesh.v_tex is None:
            raise ValueError("geometry 'mesh' (texture: uv) has a mesh without UVs; load a checkpoint or use create_from")
        vert_uv = torch.zeros(mesh.n_vertices, 2, device=mesh.v_tex.device)
        vert_uv[mesh.t_pos_idx.reshape(-1)] = mesh.v_tex[mesh.t_tex_idx.reshape(-1)]
        tree = cKDTree(mesh.v_pos.detach().cpu().numpy())
        _, idx = tree.query(points.detach().cpu().numpy())
        return vert_uv[torch.from_numpy(idx).to(vert_uv.device)]

    def uv_texture(self) -> tuple[Mesh, Tensor] | None:
        """(mesh with UVs, texture [T, T, C] in image layout) for exporters to write as is; None without one."""
        if self.feature_field is not None:
            return None
        return self.isosurface(), self.texture

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        BaseGeometry.update_step(self, epoch, global_step, on_load_weights)
        if self.feature_field is not None:
            self.feature_field.update_step(epoch, global_step, on_load_weights)

    # ------------------------------------------------------------------ stage switch and checkpoints

    @classmethod
    def create_from(cls, other: BaseGeometry, cfg: Any = None, **kwargs: Any) -> "MeshGeometry":
        """A mesh from any geometry with ``isosurface()`` (Gaussians, NeRF, DMTet, ...), appearance from its colours.

        ``texture: field`` distils ``other.export_attributes`` into the feature field near the surface;
        ``texture: uv`` unwraps the surface and bakes those features into the texture (the exporter's bake).
        The same type with the same texture mode is copied.
        """
        if type(other) is cls:
            mode = parse_structured(cls.Config, cfg if cfg is not None else {}, key=kwargs.get("cfg_key", ""),
                                    prov=kwargs.get("prov")).texture
            if mode == other.cfg.texture:
                return super().create_from(other, cfg, **kwargs)  # type: ignore[return-value]
        try:
            with torch.no_grad():
                surface = other.isosurface()
        except NotImplementedError:
            raise NotImplementedError(
                f"cannot convert geometry {getattr(type(other), 'registry_name', type(other).__name__)!r} into "
                "'mesh': it has no isosurface()"
            ) from None
        surface = Mesh(surface.v_pos.detach(), surface.t_pos_idx.detach(),
                       None if surface.v_tex is None else surface.v_tex.detach(),
                       None if surface.t_tex_idx is None else surface.t_tex_idx.detach(),
                       {k: t.detach() for k, t in surface.extras.items()})
        new = cls(cfg, init_mesh=surface, **kwargs)
        new.to(surface.v_pos.device)
        if new.feature_field is None:
            new._bake_from(other)
        elif new.cfg.feature_fit_steps > 0:
            surf = new.v_pos
            g = torch.Generator(device="cpu").manual_seed(0)
            near = surf + torch.randn(surf.shape, generator=g).to(surf) * (0.01 * new.cfg.radius)
            new.feature_fit_mse = fit_features(new.feature_field, other, torch.cat([surf, near]),
                                               new.cfg.feature_fit_steps)
        return new

    def _bake_from(self, other: BaseGeometry) -> None:
        def features(points: Tensor) -> dict[str, Tensor]:
            return {"features": other.export_attributes(points)["features"]}

        try:
            baked = bake_texture(self.isosurface(), features, self.cfg.texture_size,
                                 pad_pixels=self.cfg.texture_pad_pixels, tangent_normals=False)["features"]
        except NotImplementedError:
            warnings.warn(f"{type(other).__name__} exports no features; the UV texture starts at 0")
            return
        if baked.shape[-1] != self.texture.shape[-1]:
            warnings.warn(f"cannot copy features: source has {baked.shape[-1]} channels, this geometry "
                          f"{self.texture.shape[-1]}; the UV texture starts at 0")
            return
        with torch.no_grad():
            self.texture.copy_(baked.to(self.texture))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The mesh and texture sizes come from the checkpoint: adopt its shapes before copying.
        for name in ("v_pos", "t_pos_idx", "v_tex", "t_tex_idx"):
            key = prefix + name
            if key in state_dict:
                cur = getattr(self, name)
                setattr(self, name, cur.new_empty(state_dict[key].shape))
        key = prefix + "texture"
        if self.feature_field is None and key in state_dict and state_dict[key].shape != self.texture.shape:
            self.texture = nn.Parameter(self.texture.new_empty(state_dict[key].shape))
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self._from_file:
            # Checkpoints written before meshes were saved: the file's mesh stands.
            mesh_keys = {prefix + n for n in ("v_pos", "t_pos_idx", "v_tex", "t_tex_idx")}
            missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k not in mesh_keys]


def sample_uv_texture(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinear lookup of ``texture`` [T, T, C] (image layout: row 0 is v = 1) at ``uv`` [N, 2] (v up) -> [N, C]."""
    # rasterize_ops.texture puts v = 0 on row 0: flip v instead of the image.
    st = torch.stack([uv[:, 0], 1.0 - uv[:, 1]], -1)
    return tex_op(texture[None], st[None, :, None, :], filter_mode="linear", boundary_mode="clamp")[0, :, 0, :]
