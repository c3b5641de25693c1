"""Textured mesh export: isosurface -> xatlas UV unwrap -> texture bake -> OBJ/MTL/PNG, GLB, PLY.

The pipeline of the mesh exports of Magic3D (Lin et al. 2023) and Fantasia3D (Chen et al. 2023),
as threestudio runs it: extract the surface of the trained field, unwrap it, and bake the
material's texture channels (albedo always; roughness / metallic / a tangent-space normal map
when available) by rasterizing the mesh in UV space (see :mod:`lift3d.utils.uv`). A geometry
that already has a UV texture (``uv_texture()``, e.g. DreamGaussian's refined mesh) is written with
its own UVs and texels instead, with no unwrap or re-bake. A Gaussian geometry can additionally
write its own splat PLY.

Frames: OBJ and PLY keep lift3d's +z-up world; GLB is rotated to glTF's +y up,
``(x, y, z) -> (x, z, -y)`` (see :mod:`lift3d.exporters.formats`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor

from lift3d.exporters.base import BaseExporter
from lift3d.exporters.formats import TEXTURE_CHANNELS, write_glb, write_obj, write_ply
from lift3d.renderers.volume import composite_weights
from lift3d.registry import register
from lift3d.utils.io import to_uint8
from lift3d.utils.mesh import Mesh
from lift3d.utils.uv import bake_texture, unwrap_uv

log = logging.getLogger(__name__)

FORMATS = ("obj", "glb", "ply")


@register("mesh-exporter")
class MeshExporter(BaseExporter):
    """Writes ``<name>.obj`` + ``<name>.mtl`` + ``texture_kd.png`` (+ PBR maps), ``<name>.glb``, ``<name>.ply``.

    Returned kinds: ``obj``, ``mtl``, ``texture_kd`` / ``texture_pr`` / ``texture_pm`` /
    ``texture_n``, ``glb``, ``ply``, ``gaussian_ply``.
    """

    @dataclass
    class Config(BaseExporter.Config):
        fmt: list[str] = field(default_factory=lambda: ["obj", "glb"])
        """Files to write: any of ``obj`` (with MTL and PNG textures), ``glb``, ``ply``
        (vertex-coloured, no UVs). An empty list writes no mesh (e.g. only ``save_gaussian_ply``)."""
        texture_size: int = 1024
        """Width and height of the baked textures, in texels."""
        texture_format: Literal["png"] = "png"
        """Image format of the OBJ textures (only ``png``: lossless, with the exact baked values)."""
        pad_pixels: int = 4
        """Seam padding: texels the baked charts are grown by, so filtering at chart borders
        does not pick up background colour."""
        uv_padding: int = 2
        """Gap xatlas leaves around each chart when packing, in atlas texels."""
        xatlas_chart_options: dict[str, Any] = field(default_factory=dict)
        """Fields of xatlas's ChartOptions, e.g. ``{max_chart_area: 0.05}`` or ``{max_iterations: 0}``:
        bounding chart size keeps xatlas fast on large, noisy isosurfaces (it otherwise grows huge
        charts, then splits them into many small ones, which can take minutes)."""
        xatlas_pack_options: dict[str, Any] = field(default_factory=dict)
        """Fields of xatlas's PackOptions beyond ``resolution`` (= texture_size) and ``padding`` (= uv_padding)."""
        unwrap_timeout: Optional[float] = None
        """Seconds the xatlas child process may run before the export fails with advice; null = no limit."""
        save_pbr: bool = True
        """Bake the ``roughness`` and ``metallic`` channels when the material's ``export`` returns them
        (MTL ``map_Pr`` / ``map_Pm``; GLB metallicRoughnessTexture)."""
        save_normal_map: bool = False
        """Bake a tangent-space normal map from the ``normal`` the geometry's ``export_attributes``
        (or the material's ``export``) returns; skipped with a warning when neither has one."""
        vertex_color_ply: bool = False
        """Also write ``<name>.ply`` with per-vertex albedo (the same as adding ``ply`` to ``fmt``)."""
        save_gaussian_ply: bool = False
        """Also call ``geometry.export_ply(<name>_gaussians.ply)`` when the geometry has it (3D Gaussians)."""
        chunk_size: int = 262144
        """Points per call of the geometry and material while baking (bounds memory)."""
        volume_bake_band: float = 0.0
        """For density fields (geometries with ``forward_density``, e.g. ``implicit-volume``): read each
        texel's channels as a volume render sees the surface head-on, composited along the inward
        normal over ``[+band, -band]`` around the surface point (world units), instead of at the point
        itself. A NeRF's colour changes with depth, and its isosurface is not where its renders take
        their colour from. 0 reads at the surface point; other geometries always do."""
        volume_bake_samples: int = 16
        """Samples along the normal for ``volume_bake_band``."""

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        bad = [f for f in self.cfg.fmt if f not in FORMATS]
        if bad:
            raise ValueError(f"mesh-exporter: unknown fmt {bad}; valid formats: {', '.join(FORMATS)}")
        if self.cfg.texture_size < 8:
            raise ValueError(f"mesh-exporter: texture_size must be at least 8, got {self.cfg.texture_size}")
        if self.cfg.pad_pixels < 0 or self.cfg.uv_padding < 0:
            raise ValueError("mesh-exporter: pad_pixels and uv_padding must be >= 0")
        if self.cfg.volume_bake_samples < 2:
            raise ValueError(f"mesh-exporter: volume_bake_samples must be at least 2, got {self.cfg.volume_bake_samples}")

    def attribute_fn(self, geometry: Any, material: Any) -> Callable[[Tensor], dict[str, Tensor]]:
        """points [N, 3] -> texture channels ``{albedo [N,3], roughness [N,1], ...}`` in [0, 1]."""
        warned: set[str] = set()

        def fn(pts: Tensor) -> dict[str, Tensor]:
            return self.channels(geometry.export_attributes(pts), material, warned)

        band = float(self.cfg.volume_bake_band)
        if band <= 0 or not callable(getattr(geometry, "forward_density", None)):
            return fn
        k = int(self.cfg.volume_bake_samples)
        step = max(1, self.cfg.chunk_size // k)

        def composited(pts: Tensor) -> dict[str, Tensor]:
            return _cat_channels([volume_channels(geometry, fn, pts[s : s + step], band, k)
                                  for s in range(0, pts.shape[0], step)])

        return composited

    def channels(self, attrs: dict[str, Tensor], material: Any, warned: set[str]) -> dict[str, Tensor]:
        """Geometry attributes ``{features [N, C], ...}`` -> the texture channels this exporter writes."""
        chans = dict(material.export(attrs["features"]))
        if "albedo" not in chans:
            raise ValueError(f"{type(material).__name__}.export must return an 'albedo' channel, got {list(chans)}")
        if self.cfg.save_normal_map and "normal" not in chans and "normal" in attrs:
            chans["normal"] = attrs["normal"]
        keep = {"albedo"}
        if self.cfg.save_pbr:
            keep |= {"roughness", "metallic"}
        if self.cfg.save_normal_map:
            keep.add("normal")
        for k in set(chans) - keep - warned:
            if k not in TEXTURE_CHANNELS:
                log.warning("mesh-exporter: material channel %r has no texture slot; not exported", k)
            warned.add(k)
        return {k: v for k, v in chans.items() if k in keep}

    def own_texture(self, geometry: Any, material: Any) -> tuple[Mesh, dict[str, Tensor]] | None:
        """A geometry's own UV texture (``geometry.uv_texture()``: mesh with UVs, features [T, T, C] in image
        layout) turned into texture channels texel by texel; None when the geometry has none."""
        getter = getattr(geometry, "uv_texture", None)
        own = getter() if callable(getter) else None
        if own is None:
            return None
        uv_mesh, feats = own
        T, C = feats.shape[0], feats.shape[-1]
        chans = self.channels({"features": feats.reshape(-1, C)}, material, set())
        return uv_mesh, {k: v.reshape(T, feats.shape[1], -1).float() for k, v in chans.items()}

    def export(self, geometry: Any, material: Any, out_dir: Path, name: str = "model") -> dict[str, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        fmts = list(dict.fromkeys(self.cfg.fmt + (["ply"] if self.cfg.vertex_color_ply else [])))
        if fmts:
            with torch.no_grad():
                written.update(self._export_mesh(geometry, material, out_dir, name, fmts))
        if self.cfg.save_gaussian_ply:
            if callable(getattr(geometry, "export_ply", None)):
                path = out_dir / f"{name}_gaussians.ply"
                geometry.export_ply(path)
                written["gaussian_ply"] = path
            else:
                log.warning("mesh-exporter: save_gaussian_ply is set but %s has no export_ply; skipped",
                            type(geometry).__name__)
        return written

    def _export_mesh(self, geometry: Any, material: Any, out_dir: Path, name: str, fmts: list[str]) -> dict[str, Path]:
        cfg = self.cfg
        mesh: Mesh = geometry.isosurface()  # IsosurfaceError propagates with its advice
        attr_fn = self.attribute_fn(geometry, material)
        written: dict[str, Path] = {}
        if "obj" in fmts or "glb" in fmts:
            own = self.own_texture(geometry, material)
            if own is not None:  # a UV-textured geometry: write its texture and UVs as they are
                uv_mesh, baked = own
            else:
                uv_mesh = unwrap_uv(mesh, texture_size=cfg.texture_size, padding=cfg.uv_padding,
                                    chart_options=cfg.xatlas_chart_options, pack_options=cfg.xatlas_pack_options,
                                    timeout=cfg.unwrap_timeout)
                baked = bake_texture(uv_mesh, attr_fn, cfg.texture_size, pad_pixels=cfg.pad_pixels,
                                     chunk_size=cfg.chunk_size)
            if "normal" not in baked and cfg.save_normal_map:
                log.warning("mesh-exporter: save_normal_map is set but neither the geometry nor the material "
                            "returns 'normal'; no normal map written")
            textures = {k: to_uint8(v) for k, v in baked.items() if k in TEXTURE_CHANNELS}
            if "obj" in fmts:
                written.update(write_obj(out_dir / f"{name}.obj", uv_mesh, textures))
            if "glb" in fmts:
                written["glb"] = write_glb(out_dir / f"{name}.glb", uv_mesh, textures)
        if "ply" in fmts:
            pts = mesh.v_pos.float()
            cols = [attr_fn(pts[s : s + cfg.chunk_size])["albedo"] for s in range(0, pts.shape[0], cfg.chunk_size)]
            colors = torch.cat(cols, dim=0) if cols else torch.zeros(0, 3)
            written["ply"] = write_ply(out_dir / f"{name}.ply", mesh, colors)
        return written


def volume_channels(geometry: Any, fn: Callable[[Tensor], dict[str, Tensor]], pts: Tensor, band: float,
                    k: int) -> dict[str, Tensor]:
    """Channels at surface points ``pts`` [N, 3] of a density field as a head-on volume render sees them.

    The outward normal is minus the density gradient; ``k`` samples run from ``pts + band n`` to
    ``pts - band n`` and the channels ``fn`` gives there are composited with the volume renderer's
    weights (:func:`lift3d.renderers.volume.composite_weights`), normalised by their sum. Points whose band holds
    almost no opacity (sum of weights < 1e-3) keep the channels at the point itself.
    """
    with torch.enable_grad():
        p = pts.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(geometry.forward_density(p).sum(), p)
    normal = -torch.nn.functional.normalize(grad, dim=-1)
    offsets = torch.linspace(band, -band, k, device=pts.device, dtype=pts.dtype)
    q = (pts[:, None, :] + offsets[None, :, None] * normal[:, None, :]).reshape(-1, 3)
    with torch.no_grad():
        sigma = geometry.forward_density(q).reshape(-1, k).float()
    t = (band - offsets.float()).expand(sigma.shape[0], k)  # distance along the inward ray
    w, _, _ = composite_weights(sigma, t, t + 2.0 * band / (k - 1))
    total = w.sum(1, keepdim=True)
    at_point = fn(pts)
    along = fn(q)
    out = {}
    for name, val in along.items():
        mix = (w[..., None] * val.reshape(-1, k, val.shape[-1]).float()).sum(1) / total.clamp_min(1e-6)
        out[name] = torch.where(total > 1e-3, mix.to(val.dtype), at_point[name])
    return out


def _cat_channels(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {key: torch.cat([p[key] for p in parts], 0) for key in parts[0]}
