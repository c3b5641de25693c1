"""DMTet geometry: per-vertex SDF and deformation on a tetrahedral grid, plus a feature field.

Implements DMTet (Shen et al., NeurIPS 2021, "Deep Marching Tetrahedra") as used by Magic3D's
fine stage (Lin et al., CVPR 2023) and Fantasia3D (Chen et al., ICCV 2023): the surface is the
zero level set of an SDF stored at the vertices of a tetrahedral grid (see ``tets.py`` for the
6-tetrahedra-per-cube grid), the vertices may move by up to half a cell (``tanh`` bound), and
marching tetrahedra extracts a mesh differentiable w.r.t. both, which the mesh rasterizer renders.

Initialisation (``shape_init``): a sphere or ellipsoid, a mesh file (inside/outside by ray parity,
distance by a Euclidean distance transform), or ``create_from`` another geometry: an implicit one
(NeRF / NeuS: the SDF is its signed level ``forward_level(forward_field(x))``, the Magic3D
NeRF -> DMTet switch) or anything with ``isosurface()``; its features are distilled into ours.
The feature field and that distillation live in :mod:`lift3d.geometry.feature_field`, shared with
the fixed-mesh geometry; mesh files are read by :mod:`lift3d.utils.mesh_io`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lift3d.geometry.base import BaseGeometry, BaseImplicitGeometry, IsosurfaceError
from lift3d.geometry.feature_field import (FeatureFieldConfig, FeatureFieldGeometry, build_feature_field,
                                          fit_features)
from lift3d.geometry.isosurface import fill_cavities
from lift3d.geometry.tets import marching_tets, tet_grid
from lift3d.registry import register
from lift3d.utils.mesh import Mesh
from lift3d.utils.mesh_io import load_mesh_file


def mesh_inside_grid(v: Tensor, f: Tensor, axis_values: Tensor, return_distance: bool = False) -> Any:
    """Inside/outside of a closed mesh at the lattice ``axis_values``^3 ([n, n, n] bool, indexed x, y, z).

    Casts one ray per (x, y) column along +z and counts crossings below each lattice point (odd =
    inside); the ray-triangle tests are a 2D point-in-triangle test vectorised over each
    triangle's bounding box of columns. Columns are nudged by a tiny irrational offset so they do
    not pass exactly through mesh edges of axis-aligned models. With ``return_distance`` also
    returns [n, n, n] distances along z from each lattice point to the nearest crossing between it
    and its z-neighbours (inf where there is none).
    """
    n = axis_values.shape[0]
    lo, step = float(axis_values[0]), float(axis_values[1] - axis_values[0])
    v = v.double()
    tri = v[f]  # [F, 3, 3]
    jitter = step * torch.tensor([1.234567e-4, 2.345678e-4], dtype=torch.float64)
    gx = (tri[..., 0] - lo - jitter[0]) / step  # column coordinates
    gy = (tri[..., 1] - lo - jitter[1]) / step
    x0 = torch.ceil(gx.amin(-1)).clamp(min=0).long()
    x1 = torch.floor(gx.amax(-1)).clamp(max=n - 1).long()
    y0 = torch.ceil(gy.amin(-1)).clamp(min=0).long()
    y1 = torch.floor(gy.amax(-1)).clamp(max=n - 1).long()
    ok = (x1 >= x0) & (y1 >= y0)
    ids = ok.nonzero().squeeze(1)
    bw = (x1 - x0 + 1)[ids]
    counts = bw * (y1 - y0 + 1)[ids]
    hits = torch.zeros(n * n, n + 1, dtype=torch.int32)
    zdist = torch.full((n * n * n,), float("inf"), dtype=torch.float64)
    starts = torch.cumsum(counts, 0) - counts
    for chunk in torch.arange(ids.numel()).split(65536):
        cnt = counts[chunk]
        local = torch.repeat_interleave(chunk, cnt)
        k = torch.arange(int(cnt.sum())) - (starts[local] - starts[chunk[0]])
        t = ids[local]
        cx = x0[t] + k % bw[local]
        cy = y0[t] + torch.div(k, bw[local], rounding_mode="floor")
        px, py = cx.double(), cy.double()
        ax, ay = gx[t], gy[t]  # [P, 3]
        bx, by = ax.roll(-1, 1), ay.roll(-1, 1)
        e = (bx - ax) * (py[:, None] - ay) - (by - ay) * (px[:, None] - ax)  # [P, 3]
        area = e.sum(-1)
        inside = ((e >= 0).all(-1) | (e <= 0).all(-1)) & (area.abs() > 1e-12)
        if not inside.any():
            continue
        # Crossing height: barycentric blend of the vertex z (edge k is opposite vertex k+2).
        lam = e[inside] / area[inside, None]
        zt = tri[t[inside]][..., 2]
        z = (lam * zt.roll(1, 1)).sum(-1)
        kz = torch.ceil((z - lo) / step).clamp(0, n).long()
        col = cx[inside] * n + cy[inside]
        hits.index_put_((col, kz), torch.ones_like(kz, dtype=torch.int32), accumulate=True)
        if return_distance:
            for kk in (kz - 1, kz):  # the lattice points just below and above the crossing
                okk = (kk >= 0) & (kk < n)
                d = (lo + kk[okk].double() * step - z[okk]).abs()
                zdist.scatter_reduce_(0, col[okk] * n + kk[okk], d, reduce="amin")
    parity = (torch.cumsum(hits, 1)[:, :n] % 2).view(n, n, n).bool()
    return (parity, zdist.view(n, n, n)) if return_distance else parity


def sdf_from_occupancy(inside: Tensor, spacing: float) -> Tensor:
    """Approximate signed distance [n, n, n] (negative inside) from a lattice occupancy, in world units."""
    try:
        from scipy.ndimage import distance_transform_edt
    except ImportError:  # scipy is optional: a sign with one-cell magnitude still gives a surface
        return (0.5 - inside.float()) * spacing
    occ = inside.cpu().numpy()
    d_out = distance_transform_edt(~occ)  # outside points: distance to the nearest inside point
    d_in = distance_transform_edt(occ)
    sdf = torch.from_numpy(d_out - d_in).float()
    # Halfway between the last inside and first outside lattice points is the surface.
    sdf = torch.where(inside, sdf + 0.5, sdf - 0.5)
    return sdf * spacing


@register("tetrahedra-sdf-grid")
class TetrahedraSDFGrid(FeatureFieldGeometry):
    """DMTet: ``isosurface()`` is a differentiable marching-tetrahedra mesh; features from a grid field."""

    @dataclass
    class Config(BaseGeometry.Config, FeatureFieldConfig):
        isosurface_resolution: int = 64
        """Tet grid resolution (cubes per axis; 6 tetrahedra each). 32-256; memory and time grow with its cube."""
        isosurface_deformable_grid: bool = True
        """Learn per-vertex offsets, bounded by tanh to half a grid cell."""
        shape_init: str | None = "sphere:0.5"
        """Initial SDF: ``sphere:R``, ``ellipsoid:A,B,C`` (world units), ``mesh:PATH`` (normalised into
        0.9 radius, +z up; ``.glb``/``.gltf`` converted from +y up), or null (a sphere of half the radius)."""
        fix_geometry: bool = False
        """Freeze the SDF and deformation (texture-only stages); the mesh is then extracted once and cached."""
        feature_fit_steps: int = 300
        """Adam steps used by ``create_from`` to distil the source geometry's features into ours."""

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        res = self.cfg.isosurface_resolution
        if res < 2:
            raise ValueError(f"isosurface_resolution must be >= 2, got {res}")
        unit, tets = tet_grid(res)
        self.register_buffer("grid_unit", unit, persistent=False)  # [V, 3] in [-1, 1]^3
        self.register_buffer("tets", tets, persistent=False)  # [T, 4]
        V = unit.shape[0]
        train_geo = not self.cfg.fix_geometry
        self.sdf = nn.Parameter(torch.zeros(V), requires_grad=train_geo)
        self.deformation = nn.Parameter(
            torch.zeros(V, 3), requires_grad=train_geo and self.cfg.isosurface_deformable_grid
        )
        self.feature_field = build_feature_field(self.cfg)
        self._mesh_cache: tuple[Any, Mesh] | None = None
        self.initialize_shape()

    # ------------------------------------------------------------------ shape

    @property
    def cell_size(self) -> float:
        return 2.0 * self.cfg.radius / self.cfg.isosurface_resolution

    @property
    def grid_vertices(self) -> Tensor:
        """[V, 3] undeformed grid vertices in world units."""
        return self.grid_unit * self.cfg.radius

    def vertex_positions(self) -> Tensor:
        """[V, 3] deformed grid vertices (offsets bounded by half a cell)."""
        v = self.grid_vertices
        if self.cfg.isosurface_deformable_grid:
            v = v + torch.tanh(self.deformation) * (0.5 * self.cell_size)
        return v

    def initialize_shape(self) -> None:
        spec = self.cfg.shape_init
        if spec is None:
            spec = f"sphere:{0.5 * self.cfg.radius}"
        kind, _, arg = spec.partition(":")
        p = self.grid_vertices
        try:
            if kind == "sphere":
                sdf = p.norm(dim=-1) - float(arg)
            elif kind == "ellipsoid":
                axes = torch.tensor([float(a) for a in arg.split(",")])
                if axes.shape != (3,):
                    raise ValueError("three semi-axes")
                # Scaled implicit; exact zero set, SDF-like magnitude near the surface.
                sdf = ((p / axes).norm(dim=-1) - 1.0) * axes.min()
            elif kind == "mesh":
                mesh = load_mesh_file(arg, normalize=True, radius=self.cfg.radius)
                sdf = self.sdf_from_mesh(mesh.v_pos, mesh.t_pos_idx)
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"tetrahedra-sdf-grid shape_init {spec!r} is invalid ({exc}); use 'sphere:R', "
                "'ellipsoid:A,B,C', 'mesh:PATH' or null"
            ) from None
        with torch.no_grad():
            self.sdf.copy_(sdf.to(self.sdf))
        self._mesh_cache = None

    def sdf_from_mesh(self, v: Tensor, f: Tensor) -> Tensor:
        """[V] approximate SDF of a closed mesh at the (undeformed) grid vertices."""
        n = self.cfg.isosurface_resolution + 1
        axis = torch.linspace(-self.cfg.radius, self.cfg.radius, n, dtype=torch.float64)
        v = v.detach().cpu().double()
        f = f.detach().cpu()
        votes, dist = torch.zeros(n, n, n), torch.full((n, n, n), float("inf"), dtype=torch.float64)
        # Cast along each axis: a majority vote on inside/outside survives rays grazing the
        # surface, and exact distances to crossings along the axes place the zero level between
        # lattice points to sub-cell accuracy (the distance transform alone is half a cell off).
        for perm in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
            occ_p, d_p = mesh_inside_grid(v[:, perm], f, axis, return_distance=True)
            back = [perm.index(i) for i in range(3)]
            votes += occ_p.permute(*back).float()
            dist = torch.minimum(dist, d_p.permute(*back))
        inside = votes >= 2
        sdf = sdf_from_occupancy(inside, self.cell_size).double()
        near = torch.isfinite(dist)
        sdf = torch.where(near, torch.where(inside, -dist, dist), sdf)
        # tet_grid's vertex order is x-major, then y, then z: the same as [n, n, n].reshape(-1).
        return sdf.float().reshape(-1)

    # ------------------------------------------------------------------ surface and features

    def isosurface(self) -> Mesh:
        frozen = self.cfg.fix_geometry or not (torch.is_grad_enabled() and self.sdf.requires_grad)
        key = (self.sdf._version, self.deformation._version, self.sdf.device, self.sdf.data_ptr())
        if frozen and self._mesh_cache is not None and self._mesh_cache[0] == key:
            return self._mesh_cache[1]
        v, faces = marching_tets(self.vertex_positions(), self.sdf, self._surface_tets())
        if faces.shape[0] == 0:
            lo, hi = float(self.sdf.detach().min()), float(self.sdf.detach().max())
            where = "outside" if lo >= 0 else "inside"
            raise IsosurfaceError(
                f"DMTet found no surface: every grid vertex is {where} (sdf range [{lo:.3g}, {hi:.3g}]); "
                "the shape collapsed or grew past the grid: lower the learning rate of the sdf, "
                "add sdf regularisation, or check shape_init"
            )
        mesh = Mesh(v, faces)
        if frozen:
            mesh = Mesh(v.detach(), faces)
            self._mesh_cache = (key, mesh)
        return mesh

    @torch.no_grad()
    def _surface_tets(self) -> Tensor:
        """The tetrahedra of lattice cubes whose corners straddle the surface.

        Deformation moves vertices but keeps the lattice's connectivity, so a cube's 6 tetrahedra
        (stored consecutively by ``tet_grid``) can only hold surface if its 8 corners differ in
        sign. Min/max pooling on the dense grid of signs finds those cubes far faster than
        gathering the signs of every tetrahedron (12.6M at resolution 128).
        """
        res = self.cfg.isosurface_resolution
        occ = (self.sdf < 0).to(torch.float32).view(1, 1, res + 1, res + 1, res + 1)
        hi = F.max_pool3d(occ, 2, stride=1)
        lo = -F.max_pool3d(-occ, 2, stride=1)
        cubes = (hi != lo).view(-1).nonzero().squeeze(1)  # [C] cube index (i * res + j) * res + k
        ids = (cubes[:, None] * 6 + torch.arange(6, device=cubes.device)).reshape(-1)
        return self.tets[ids]

    # ------------------------------------------------------------------ stage switch

    @classmethod
    def create_from(cls, other: BaseGeometry, cfg: Any = None, **kwargs: Any) -> "TetrahedraSDFGrid":
        """DMTet from another geometry: same type copies weights; an implicit field gives the SDF
        from its signed level (negative inside); any other geometry with ``isosurface()`` is
        voxelised. Features are distilled from ``other.export_attributes`` when it has them."""
        if type(other) is cls:
            return super().create_from(other, cfg, **kwargs)  # type: ignore[return-value]
        new = cls(cfg, **kwargs)
        ref = next(iter(other.parameters()), None) if isinstance(other, nn.Module) else None
        device = ref.device if ref is not None else torch.device("cpu")
        new = new.to(device)
        with torch.no_grad():
            if isinstance(other, BaseImplicitGeometry):
                pts = new.grid_vertices
                # The level of the whole grid at once: an "auto" threshold depends on all of the field.
                field = torch.cat([other.forward_field(p) for p in pts.split(65536)])
                solid_level = getattr(other, "solid_level", None)
                if solid_level is not None:
                    # A density field fills what it hides, as its own isosurface does, so a shell
                    # that leaks at the chosen level still converts to a solid.
                    n = new.cfg.isosurface_resolution + 1
                    level = solid_level(field.reshape(n, n, n), new.cell_size).reshape(-1)
                else:
                    level = other.forward_level(field).reshape(-1)
                new.sdf.copy_(new.sdf_from_level(level.to(new.sdf)))
            else:
                mesh = other.isosurface()
                new.sdf.copy_(new.sdf_from_mesh(mesh.v_pos, mesh.t_pos_idx).to(new.sdf))
        new._mesh_cache = None
        if new.cfg.feature_fit_steps > 0:
            with torch.no_grad():
                surf = new.isosurface().v_pos.detach()
            g = torch.Generator(device="cpu").manual_seed(0)
            r = new.cfg.radius
            near = surf + torch.randn(surf.shape, generator=g).to(surf) * (0.02 * r)
            box = (torch.rand(4096, 3, generator=g) * 2 - 1).to(surf) * r
            new.feature_fit_mse = fit_features(new.feature_field, other, torch.cat([surf, near, box]),
                                               new.cfg.feature_fit_steps)
        return new

    def sdf_from_level(self, level: Tensor) -> Tensor:
        """[V] SDF at the grid vertices from a signed level of another field (negative inside).

        Within a cell of the surface the rescaled level is kept (sub-cell placement of the zero
        set); farther out the distance transform of the inside/outside lattice takes over. A NeRF's
        level (threshold - density) is flat in empty space, so rescaled alone it would leave tiny
        positive values there that the first updates flip into floaters.
        """
        n = self.cfg.isosurface_resolution + 1
        # A NeRF may be hollow inside (only its shell is seen): no inner surfaces in the DMTet.
        level = fill_cavities(level.reshape(n, n, n)).reshape(-1)
        scaled = self._normalise_level(level).clamp(-self.cell_size, self.cell_size)
        far = sdf_from_occupancy((level < 0).reshape(n, n, n), self.cell_size).reshape(-1).to(level)
        # Vertices of tetrahedra the surface crosses keep the (sub-cell accurate) rescaled level.
        n_in = (level[self.tets] < 0).sum(-1)
        crossed = self.tets[(n_in > 0) & (n_in < 4)].long().reshape(-1)
        near = torch.zeros_like(level, dtype=torch.bool).index_fill(0, crossed, True)
        return torch.where(near, scaled, far)

    def _normalise_level(self, level: Tensor) -> Tensor:
        """Rescale a signed level so its slope across the surface is about 1 (an SDF's).

        Density-based levels (NeRF) have arbitrary scale; SDF learning rates assume world units.
        Rescaling keeps the zero set, hence the surface, exactly.
        """
        occ = level[self.tets] < 0  # [T, 4]
        n_in = occ.sum(-1)
        tets = self.tets[(n_in > 0) & (n_in < 4)].long()
        if tets.shape[0] == 0:
            return level
        # Gradient of the linear interpolant in each tetrahedron that holds surface: solve
        # [p_i - p_0] g = [s_i - s_0] (exact for a linear field, so an SDF keeps |g| = 1).
        p = self.grid_vertices[tets].double()  # [Ts, 4, 3]
        sv = level[tets].double()
        g = torch.linalg.solve(p[:, 1:] - p[:, :1], (sv[:, 1:] - sv[:, :1])[..., None])[..., 0]
        slope = g.norm(dim=-1).median().to(level.dtype)
        if not torch.isfinite(slope) or slope <= 0:
            return level
        return level / slope
