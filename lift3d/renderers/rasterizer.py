"""Mesh renderer: rasterize the geometry's triangle mesh, shade covered pixels, antialias edges.

The deferred-shading pipeline of Magic3D's fine stage and Fantasia3D (Lin et al., 2023,
"Magic3D: High-Resolution Text-to-3D Content Creation"; Chen et al., 2023, "Fantasia3D"), built on
the primitives of :mod:`lift3d.utils.rasterize_ops` (nvdiffrast's design, Laine et al., 2020): the mesh comes from
``geometry.isosurface()`` (differentiable for DMTet), features are queried from the geometry at the
interpolated world position of every covered pixel, the material turns them into colour, and
``antialias`` makes silhouettes carry gradients to the vertices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.registry import register
from lift3d.renderers.base import BaseRenderer
from lift3d.utils import rasterize_ops as ops
from lift3d.utils.mesh import Mesh


def _rays_from_mvp(mvp: Tensor, height: int, width: int) -> Tensor:
    """[B, H, W, 3] unit view directions through pixel centres, by unprojecting two depths."""
    dev, dt = mvp.device, mvp.dtype
    x = (torch.arange(width, device=dev, dtype=dt) + 0.5) / width * 2 - 1
    y = (torch.arange(height, device=dev, dtype=dt) + 0.5) / height * 2 - 1
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    inv = torch.linalg.inv(mvp)  # [B, 4, 4]
    pts = []
    for z in (-1.0, 1.0):
        ndc = torch.stack([xx, yy, torch.full_like(xx, z), torch.ones_like(xx)], -1)  # [H, W, 4]
        p = torch.einsum("bij,hwj->bhwi", inv, ndc)
        pts.append(p[..., :3] / p[..., 3:])
    return F.normalize(pts[1] - pts[0], dim=-1)


@register("mesh-rasterizer")
class MeshRasterizer(BaseRenderer):
    """Renders ``geometry.isosurface()`` with ``material`` over ``background``.

    Called with a camera batch: ``mvp_mtx`` [B,4,4], ``camera_positions`` [B,3],
    ``light_positions`` [B,3], ``height``, ``width``, optionally ``bg_color`` (broadcastable to
    [B,H,W,3]), ``rays_d`` [B,H,W,3] for the background, ``shading`` (forwarded to the material);
    other keys are ignored. Returns comp_rgb, comp_rgb_fg, comp_rgb_bg [B,H,W,3], opacity
    [B,H,W,1] (antialiased), depth [B,H,W,1] (distance from the camera, 0 off the mesh),
    comp_normal [B,H,W,3] and "mesh".

    Features come from ``geometry.export_attributes(positions [N, 3])``; a geometry whose
    ``samples_uv`` is true (a UV-textured mesh) also gets ``uv=`` [N, 2], the texture coordinates
    interpolated from its mesh's ``v_tex`` / ``t_tex_idx``.
    """

    @classmethod
    def provides_normals(cls, cfg: Any, material_cls: type) -> bool:
        return True

    @dataclass
    class Config(BaseRenderer.Config):
        backend: Literal["auto", "torch", "nvdiffrast"] = "auto"
        """Rasterizer: ``auto`` uses nvdiffrast when importable and on CUDA, else the torch path."""
        antialias: bool = True
        """Antialias silhouettes (needed for silhouette gradients to reach the vertices)."""
        normal_type: Literal["vertex", "face"] = "vertex"
        """Shading normals: smooth (interpolated area-weighted vertex normals) or flat per face."""

    def configure(self, geometry: Any = None, material: Any = None, background: Any = None, **kwargs: Any) -> None:
        super().configure(geometry=geometry, material=material, background=background, **kwargs)

    def _aa(self, color: Tensor, rast: Tensor, pos: Tensor, tri: Tensor) -> Tensor:
        if not self.cfg.antialias:
            return color
        return ops.antialias(color, rast, pos, tri, backend=self.cfg.backend)

    def _background(self, bg_color: Any, rays_d: Tensor | None, mvp: Tensor, H: int, W: int) -> Tensor:
        B = mvp.shape[0]
        if bg_color is not None:
            bg = torch.as_tensor(bg_color, dtype=mvp.dtype, device=mvp.device)
            if bg.ndim == 2 and bg.shape[0] == B:  # per-item colours [B, 3]
                bg = bg[:, None, None, :]
            return bg.expand(B, H, W, 3)
        if self.background is not None:
            dirs = rays_d if rays_d is not None else _rays_from_mvp(mvp, H, W)
            return self.background(dirs=dirs)
        return torch.zeros(B, H, W, 3, dtype=mvp.dtype, device=mvp.device)

    def forward(  # type: ignore[override]
        self,
        mvp_mtx: Tensor,
        camera_positions: Tensor,
        light_positions: Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        bg_color: Any = None,
        rays_d: Tensor | None = None,
        shading: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if height is None or width is None:
            if rays_d is None:
                raise ValueError("mesh-rasterizer needs height and width (or rays_d [B,H,W,3] to take them from)")
            height, width = rays_d.shape[1], rays_d.shape[2]
        H, W = int(height), int(width)
        B = mvp_mtx.shape[0]
        mesh: Mesh = self.geometry.isosurface()
        v_pos, tri = mesh.v_pos, mesh.t_pos_idx
        mvp = mvp_mtx.to(v_pos.dtype)
        cam = camera_positions.to(v_pos.dtype)
        bg = self._background(bg_color, rays_d, mvp, H, W).to(v_pos.dtype)
        if tri.shape[0] == 0:
            zeros = torch.zeros(B, H, W, 1, dtype=v_pos.dtype, device=v_pos.device)
            return {"comp_rgb": bg, "comp_rgb_fg": zeros.expand(B, H, W, 3), "comp_rgb_bg": bg, "opacity": zeros,
                    "depth": zeros, "comp_normal": zeros.expand(B, H, W, 3), "mesh": mesh}

        v_clip = torch.einsum("bij,vj->bvi", mvp, torch.cat([v_pos, torch.ones_like(v_pos[:, :1])], -1))  # [B, V, 4]
        rast = ops.rasterize(v_clip, tri, (H, W), backend=self.cfg.backend)
        mask = rast[..., 3:] > 0  # [B, H, W, 1]
        maskf = mask.to(v_pos.dtype)

        gb_pos = ops.interpolate(v_pos, rast, tri, backend=self.cfg.backend)  # [B, H, W, 3]
        if self.cfg.normal_type == "vertex":
            gb_normal = ops.interpolate(mesh.vertex_normals(), rast, tri, backend=self.cfg.backend)
        else:
            fn = mesh.face_normals()
            tid = (rast[..., 3].detach().long() - 1).clamp(min=0)
            gb_normal = fn[tid]
        gb_normal = F.normalize(gb_normal, dim=-1)
        normal_img = torch.lerp(torch.zeros_like(gb_normal), (gb_normal + 1.0) * 0.5, maskf)

        depth_img = (gb_pos - cam[:, None, None, :]).norm(dim=-1, keepdim=True) * maskf

        sel = mask[..., 0]
        positions = gb_pos[sel]  # [N, 3]
        rgb_fg = torch.zeros(B, H, W, 3, dtype=v_pos.dtype, device=v_pos.device)
        if positions.shape[0] > 0 and self.material is not None:
            cam_n = cam[:, None, None, :].expand(B, H, W, 3)[sel]
            viewdirs = F.normalize(positions - cam_n, dim=-1)
            if light_positions is None:
                light_positions = camera_positions
            lights = light_positions.to(v_pos.dtype)[:, None, None, :].expand(B, H, W, 3)[sel]
            attr_kwargs: dict[str, Any] = {}
            if getattr(self.geometry, "samples_uv", False) and mesh.v_tex is not None:
                # A UV-textured geometry is sampled at texture coordinates, not at 3D positions.
                gb_uv = ops.interpolate(mesh.v_tex, rast, mesh.t_tex_idx, backend=self.cfg.backend)
                attr_kwargs["uv"] = gb_uv[sel]
            features = self.geometry.export_attributes(positions, **attr_kwargs)["features"]
            mat_kwargs: dict[str, Any] = {}
            if shading is not None:
                mat_kwargs["shading"] = shading
            rgb = self.material(features=features, viewdirs=viewdirs, positions=positions,
                                shading_normal=gb_normal[sel], light_positions=lights, **mat_kwargs)
            rgb_fg = rgb_fg.index_put((sel,), rgb.to(v_pos.dtype))
        comp_rgb = torch.lerp(bg, rgb_fg, maskf)
        # One antialias pass for all images: the edge search is shared, only the blend is per channel.
        merged = self._aa(torch.cat([comp_rgb, maskf, normal_img], -1), rast, v_clip, tri)
        comp_rgb, opacity, comp_normal = merged.split([3, 1, 3], dim=-1)
        return {
            "comp_rgb": comp_rgb,
            "comp_rgb_fg": rgb_fg,
            "comp_rgb_bg": bg,
            "opacity": opacity,
            "depth": depth_img,
            "comp_normal": comp_normal,
            "mesh": mesh,
        }
