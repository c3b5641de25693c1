"""3D Gaussians as a geometry: parameters, initialisation, densification hooks, checkpoints, mesh.

Implements the scene representation of "3D Gaussian Splatting for Real-Time Radiance Field
Rendering" (Kerbl et al., SIGGRAPH 2023) as used for text-to-3D by DreamGaussian (Tang et al.,
ICLR 2024) and GSGEN (Chen et al., CVPR 2024). Each Gaussian has a mean ``xyz``, a log scale per
axis ``scaling``, a rotation quaternion ``rotation`` (w, x, y, z; normalised on use), an opacity
logit ``opacity`` and colour as spherical-harmonic coefficients (``features_dc`` for degree 0,
``features_rest`` for degrees 1..3, 3DGS convention ``rgb = 0.5 + SH(dirs)`` clamped at 0), or,
with ``color_mode: rgb``, a plain colour ``sigmoid(features_dc)``.

The number of Gaussians changes during training (densify / prune, see
:mod:`lift3d.geometry.gaussian_strategy`); the system drives that through ``post_backward`` and
``post_optimizer_step``. Rendering is :mod:`lift3d.renderers.splatting`. ``isosurface()`` turns
the Gaussians into a mesh as DreamGaussian does: marching cubes on their summed density.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import ConfigError, merge_dicts, to_yaml_data
from lift3d.geometry.base import BaseGeometry, IsosurfaceError
from lift3d.geometry.gaussian_strategy import PARAM_NAMES, build_strategy
from lift3d.geometry.isosurface import (fill_cavities, fill_hidden, grid_points, marching_cubes_grid,
                                        opacity_matched_level)
from lift3d.registry import register
from lift3d.utils.gaussian_math import covariance_3d, eval_sh, inverse_sigmoid, num_sh_bases, rgb_to_sh, sh_to_rgb
from lift3d.utils.gaussian_ply import read_gaussian_ply, read_ply_vertices, write_gaussian_ply
from lift3d.utils.mesh import Mesh

#: Where ``nn.Module`` keeps ``get_extra_state()`` in a state dict (after the module's prefix).
EXTRA_STATE_KEY = "_extra_state"

# ---------------------------------------------------------------------------------------------
# Blockwise sums over nearby Gaussians (isosurface density, export colours)


def gaussian_field_sum(
    points: Tensor,
    means: Tensor,
    cov_inv: Tensor,
    extent: Tensor,
    weights: Tensor,
    values: Tensor | None = None,
    block_cells: int | None = None,
    max_elements: int = 1 << 23,
) -> tuple[Tensor, Tensor | None]:
    """For each point, ``sum_i w_i g_i(x)`` and optionally ``sum_i w_i g_i(x) v_i`` with g_i = exp(-0.5 maha^2).

    points [P, 3], means [N, 3], cov_inv [N, 3, 3], extent [N, 3] (half-size of each Gaussian's
    axis-aligned cut-off box), weights [N], values [N, C]. Points are binned into a coarse grid
    of cells (``block_cells`` per axis; default about 512 points per cell); each cell only looks at the
    Gaussians whose box overlaps it, in chunks of
    ``max_elements`` point-Gaussian pairs, so memory stays bounded for any grid size.
    Returns density [P] and weighted values [P, C] (or None).
    """
    P = points.shape[0]
    dens = points.new_zeros(P)
    acc = None if values is None else points.new_zeros(P, values.shape[-1])
    if P == 0 or means.shape[0] == 0:
        return dens, acc
    if block_cells is None:
        # About 512 points per cell: small cells keep neighbour lists short; more cells cost python loop turns.
        block_cells = int(min(64, max(1, round((P / 512) ** (1 / 3)))))
    lo_all, hi_all = points.min(0).values, points.max(0).values
    cell = (hi_all - lo_all).clamp_min(1e-6) / block_cells
    cid = ((points - lo_all) / cell).floor().clamp(0, block_cells - 1).long()  # [P, 3]
    flat = (cid[:, 0] * block_cells + cid[:, 1]) * block_cells + cid[:, 2]
    order = torch.argsort(flat)
    counts = torch.bincount(flat, minlength=block_cells**3)
    starts = torch.cumsum(counts, 0) - counts
    g_lo, g_hi = means - extent, means + extent
    for c in torch.nonzero(counts).squeeze(1).tolist():
        pidx = order[starts[c] : starts[c] + counts[c]]
        pts = points[pidx]  # [p, 3]
        lo, hi = pts.min(0).values, pts.max(0).values
        near = ((g_hi >= lo) & (g_lo <= hi)).all(-1).nonzero().squeeze(1)
        if near.numel() == 0:
            continue
        step = max(1, max_elements // max(1, pts.shape[0]))
        for k0 in range(0, near.numel(), step):
            gi = near[k0 : k0 + step]
            d = pts[:, None, :] - means[gi][None]  # [p, k, 3]
            maha = (torch.einsum("pki,kij->pkj", d, cov_inv[gi]) * d).sum(-1)
            g = torch.exp(-0.5 * maha) * weights[gi][None]  # [p, k]
            dens[pidx] += g.sum(1)
            if acc is not None:
                acc[pidx] += g @ values[gi]
    return dens, acc


# ---------------------------------------------------------------------------------------------
# The geometry

@register("gaussian-splatting")
class GaussianModel(BaseGeometry):
    """A set of 3D Gaussians; parameters ``xyz``, ``features_dc``, ``features_rest``, ``scaling``, ``rotation``, ``opacity``."""

    @dataclass
    class Config(BaseGeometry.Config):
        sh_degree: int = 0
        """Spherical-harmonic degree of the colour (0..3); 0 gives view-independent colour."""
        sh_degree_interval: int = 1000
        """Steps between raising the active SH degree by one (3DGS's schedule); 0 uses full degree at once."""
        color_mode: Literal["sh", "rgb"] = "sh"
        """'sh': rgb = max(0, 0.5 + SH(dir)); 'rgb': rgb = sigmoid(features_dc), features_rest unused."""
        init: str = "ball:0.5"
        """Initialisation: 'ball:R' (uniform in a ball), 'sphere:R' (on a sphere surface), 'ply:PATH' (a 3DGS PLY, or a
        point cloud PLY with x, y, z and optional red, green, blue), 'points' (tensor passed as init_points=), 'mesh'
        (Mesh passed as init_mesh=, surface sampled), 'guidance:NAME' (the point cloud that the run's guidance NAME
        samples when training starts, e.g. Point-E's for the prompt; a resumed run keeps its checkpoint's Gaussians)."""
        n_init: int = 5000
        """Number of Gaussians created by 'ball', 'sphere' and 'mesh' initialisation."""
        init_scale: Optional[float] = None
        """Initial isotropic scale; null uses the mean distance to the 3 nearest neighbours (as 3DGS)."""
        init_opacity: float = 0.1
        """Initial opacity (after the sigmoid)."""
        init_color: Optional[list[float]] = None
        """Initial RGB in [0,1]; null gives random colours (point clouds keep their own colours)."""
        seed: Optional[int] = None
        """Seed for the random initialisation; null uses torch's global generator."""

        strategy: str = "default"
        """Densification strategy by name (see lift3d.geometry.gaussian_strategy): 'default' (3DGS) or 'none'."""
        densify_from_iter: int = 100
        """First step at which densification may run."""
        densify_until_iter: int = 3000
        """Densification (and statistics gathering) stops after this step."""
        densification_interval: int = 100
        """Steps between densify-and-prune passes."""
        densify_grad_threshold: float = 0.0002
        """Clone/split Gaussians whose mean view-space gradient norm (NDC units, averaged over views) exceeds this."""
        percent_dense: float = 0.01
        """Gaussians with max scale above percent_dense * densify_extent are split, smaller ones cloned."""
        densify_extent: Optional[float] = None
        """Scene extent used by percent_dense and prune_world_size; null uses the geometry radius."""
        split_n: int = 2
        """Children per split Gaussian."""
        opacity_reset_interval: int = 3000
        """Steps between opacity resets (opacities clamped to opacity_reset_value); 0 disables."""
        opacity_reset_value: float = 0.01
        """Opacity ceiling applied at a reset."""
        prune_opacity_threshold: float = 0.005
        """Prune Gaussians with opacity below this at each densify pass."""
        prune_world_size: float = 0.1
        """Prune Gaussians whose max scale exceeds this fraction of densify_extent (after the first reset); 0 disables."""
        max_screen_size: float = 20.0
        """Prune Gaussians whose 2D radius in pixels exceeded this (after the first opacity reset); 0 disables."""
        max_num: int = 1_000_000
        """Upper bound on the number of Gaussians; densification picks the largest gradients when it would exceed it."""

        density_thresh: Union[float, Literal["auto"]] = 1.0
        """Isosurface level of the summed Gaussian density (DreamGaussian uses 1); 'auto' = the level whose surface
        best matches where the Gaussians render 50% opacity (see ``isosurface``)."""
        isosurface_resolution: int = 128
        """Grid resolution for marching cubes."""
        isosurface_sigmas: float = 3.0
        """Cut-off of each Gaussian in standard deviations when summing density and colours."""
        isosurface_fill: bool = True
        """Make space that renders hidden solid before marching cubes: enclosed pockets, and points that every axis
        direction sees only through 50% opacity (``fill_hidden``). SDS leaves a patchy shell of faint Gaussians
        whose density dips below any level between them although it renders opaque; unfilled, its isosurface is
        a sponge (bench/README.md)."""

    cfg: Config

    def configure(
        self,
        init_points: Tensor | None = None,
        init_colors: Tensor | None = None,
        init_mesh: Mesh | None = None,
        **kwargs: Any,
    ) -> None:
        super().configure(**kwargs)
        if not 0 <= self.cfg.sh_degree <= 3:
            raise ConfigError(f"gaussian-splatting: sh_degree must be 0..3, got {self.cfg.sh_degree}")
        self.strategy = build_strategy(self.cfg)
        self.n_rest = num_sh_bases(self.cfg.sh_degree) - 1
        gen = None
        if self.cfg.seed is not None:
            gen = torch.Generator().manual_seed(self.cfg.seed)
        self._gen = gen
        init = self.cfg.init
        kind, _, arg = init.partition(":")
        if kind in ("ball", "sphere"):
            try:
                r = float(arg) if arg else 0.5
            except ValueError:
                raise ConfigError(f"gaussian-splatting: init {init!r}: radius {arg!r} is not a number") from None
            n = self.cfg.n_init
            d = F.normalize(torch.randn(n, 3, generator=gen), dim=-1)
            if kind == "ball":
                pts = d * r * torch.rand(n, 1, generator=gen) ** (1.0 / 3.0)
            else:
                pts = d * r
            self.init_from_points(pts)
        elif kind == "ply":
            if not arg:
                raise ConfigError("gaussian-splatting: init 'ply:PATH' needs a path, e.g. 'ply:points.ply'")
            self.load_ply(arg)
        elif kind == "points":
            if init_points is None:
                raise ConfigError("gaussian-splatting: init 'points' needs init_points= (a [N, 3] tensor) from the builder")
            self.init_from_points(init_points, init_colors)
        elif kind == "mesh":
            if init_mesh is None:
                raise ConfigError("gaussian-splatting: init 'mesh' needs init_mesh= (a Mesh) from the builder")
            self.init_from_mesh(init_mesh, self.cfg.n_init)
        elif kind == "guidance":
            if not arg:
                raise ConfigError("gaussian-splatting: init 'guidance:NAME' needs the name of one of the run's guidances, "
                                  "e.g. 'guidance:point_e'")
            if init_points is not None:
                self.init_from_points(init_points, init_colors)
            else:
                # No Gaussians until the system asks guidance NAME for its cloud when training starts (sampling
                # there, not here, keeps --export, --test, dry runs and resumed runs from sampling at all).
                self._set_params(**{name: torch.zeros(0, *shape) for name, shape in self._param_shapes().items()})
                self.pending_init = arg
        else:
            raise ConfigError(
                f"gaussian-splatting: unknown init {init!r}; valid: 'ball:R', 'sphere:R', 'ply:PATH', 'points', 'mesh', "
                "'guidance:NAME'"
            )

    #: The guidance whose sampled cloud this geometry still waits for (``init: guidance:NAME``); None once
    #: it has Gaussians (set, initialised from points or loaded from a checkpoint).
    pending_init: Optional[str] = None

    @classmethod
    def init_guidance(cls, cfg: Any) -> Optional[str]:
        """The guidance named by ``init: guidance:NAME`` in the parsed ``cfg``, else None (start-up checks)."""
        kind, _, arg = str(cfg.init).partition(":")
        return arg if kind == "guidance" else None

    # -- parameters ------------------------------------------------------------------------

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-Gaussian shape of each parameter."""
        return {"xyz": (3,), "features_dc": (3,), "features_rest": (self.n_rest, 3), "scaling": (3,),
                "rotation": (4,), "opacity": (1,)}

    def _set_params(self, **tensors: Tensor) -> None:
        for name in PARAM_NAMES:
            setattr(self, name, nn.Parameter(tensors[name].detach().clone().float().contiguous(), requires_grad=True))
        self.strategy.reset_stats(self)
        self.pending_init = None

    def init_from_points(self, points: Tensor, colors: Tensor | None = None, scales: Tensor | None = None) -> None:
        """Gaussians at ``points`` [N, 3] with ``colors`` [N, 3] in [0, 1] (else config/random), isotropic scale."""
        points = points.detach().float().cpu()
        n = points.shape[0]
        if n == 0:
            raise ValueError("gaussian-splatting: cannot initialise from an empty point set")
        if colors is None:
            if self.cfg.init_color is not None:
                colors = torch.tensor(self.cfg.init_color, dtype=torch.float32).expand(n, 3)
            else:
                colors = torch.rand(n, 3, generator=self._gen)
        colors = colors.detach().float().cpu().clamp(0.0, 1.0)
        if scales is None:
            s = self.cfg.init_scale if self.cfg.init_scale is not None else None
            if s is None:
                scales = knn_mean_distance(points, k=3).clamp_min(1e-7)[:, None].expand(n, 3)
            else:
                scales = torch.full((n, 3), float(s))
        if self.cfg.color_mode == "sh":
            dc = rgb_to_sh(colors)
        else:
            dc = inverse_sigmoid(colors.clamp(1e-4, 1 - 1e-4))
        rot = torch.zeros(n, 4)
        rot[:, 0] = 1.0
        op = inverse_sigmoid(torch.full((n, 1), float(self.cfg.init_opacity)))
        self._set_params(
            xyz=points, features_dc=dc, features_rest=torch.zeros(n, self.n_rest, 3), scaling=torch.log(scales),
            rotation=rot, opacity=op,
        )

    def init_from_mesh(self, mesh: Mesh, n: int) -> None:
        """Gaussians at ``n`` area-uniform samples of ``mesh``'s surface (colour from ``v_rgb`` when present)."""
        v = mesh.v_pos.detach().float().cpu()
        f = mesh.t_pos_idx.detach().cpu()
        tri = v[f]  # [F, 3, 3]
        area = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1)
        fi = torch.multinomial(area.clamp_min(1e-12), n, replacement=True, generator=self._gen)
        u = torch.rand(n, 2, generator=self._gen)
        flip = u.sum(-1) > 1
        u[flip] = 1 - u[flip]
        bary = torch.cat([1 - u.sum(-1, keepdim=True), u], dim=-1)  # [n, 3]
        pts = (tri[fi] * bary[..., None]).sum(1)
        colors = None
        if "v_rgb" in mesh.extras:
            colors = (mesh.extras["v_rgb"].detach().float().cpu()[f[fi]] * bary[..., None]).sum(1)
        self.init_from_points(pts, colors)

    @property
    def num_points(self) -> int:
        return self.xyz.shape[0]

    @property
    def active_sh_degree(self) -> int:
        if self.cfg.color_mode != "sh":
            return 0
        if self.cfg.sh_degree_interval <= 0:
            return self.cfg.sh_degree
        return min(self.cfg.sh_degree, self.global_step // self.cfg.sh_degree_interval)

    @property
    def get_xyz(self) -> Tensor:
        return self.xyz

    @property
    def get_scaling(self) -> Tensor:
        return torch.exp(self.scaling)

    @property
    def get_rotation(self) -> Tensor:
        return F.normalize(self.rotation, dim=-1)

    @property
    def get_opacity(self) -> Tensor:
        return torch.sigmoid(self.opacity)

    @property
    def get_features(self) -> Tensor:
        """[N, (sh_degree+1)^2, 3] SH coefficients (dc first)."""
        return torch.cat([self.features_dc[:, None, :], self.features_rest], dim=1)

    def base_colors(self) -> Tensor:
        """[N, 3] view-independent colour (the degree-0 part)."""
        if self.cfg.color_mode == "rgb":
            return torch.sigmoid(self.features_dc)
        return sh_to_rgb(self.features_dc).clamp_min(0.0)

    def guidance_points(self) -> tuple[Tensor, Tensor]:
        """(centres [N, 3], base colours [N, 3] in [0, 1]) for a guidance that scores the point cloud
        itself (a 3D prior such as Point-E); both differentiable."""
        return self.xyz, self.base_colors().clamp(0.0, 1.0)

    def colors(self, camera_positions: Tensor) -> Tensor:
        """[B, N, 3] colours seen from cameras at ``camera_positions`` [B, 3]."""
        deg = self.active_sh_degree
        if deg == 0:
            return self.base_colors()[None].expand(camera_positions.shape[0], -1, -1)
        dirs = F.normalize(self.xyz[None] - camera_positions[:, None, :].to(self.xyz), dim=-1)  # [B, N, 3]
        sh = self.get_features[:, : num_sh_bases(deg)]  # [N, K, 3]
        return (eval_sh(deg, sh[None].expand(dirs.shape[0], -1, -1, -1), dirs) + 0.5).clamp_min(0.0)

    def covariance(self) -> Tensor:
        """[N, 3, 3] world-space covariances."""
        return covariance_3d(self.rotation, self.get_scaling)

    # -- training hooks ------------------------------------------------------------------------

    def post_backward(self, render_out: dict) -> None:
        """After ``loss.backward()``: accumulate view-space gradient statistics for densification."""
        self.strategy.step_post_backward(self, render_out, self.global_step)

    def post_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """After ``optimizer.step()``: densify, prune and reset opacities on the strategy's schedule."""
        self.strategy.step_post_optimizer(self, optimizer, self.global_step)

    @classmethod
    def create_from(cls, other: BaseGeometry, cfg: Any = None, **kwargs: Any) -> BaseGeometry:
        """Same type: copy (any count). Another geometry with a surface: Gaussians sampled on its mesh."""
        if isinstance(other, GaussianModel) or not hasattr(other, "isosurface"):
            return super().create_from(other, cfg, **kwargs)
        mesh = other.isosurface()
        if "v_rgb" not in mesh.extras:
            try:
                mesh.extras["v_rgb"] = other.export_attributes(mesh.v_pos)["features"][:, :3].clamp(0, 1)
            except NotImplementedError:
                pass
        base = to_yaml_data(cfg) if cfg is not None and not isinstance(cfg, dict) else (cfg or {})
        return cls(merge_dicts(base, {"init": "mesh"}), init_mesh=mesh, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """The strategy's running state (view-space gradient sums, view counts, largest radii): it decides
        which Gaussians the next densify pass clones, splits and prunes, so a resumed run needs it to
        continue as the uninterrupted one would. Tensors and strings only: loads with ``weights_only``."""
        return {"strategy": self.cfg.strategy, "state": self.strategy.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("strategy") != self.cfg.strategy:
            if isinstance(state, dict):
                warnings.warn(f"gaussian-splatting: the checkpoint's densification state belongs to strategy "
                              f"{state.get('strategy')!r}, this geometry uses {self.cfg.strategy!r}; starting afresh")
            self.strategy.reset_stats(self)
            return
        self.strategy.load_state_dict(state.get("state") or {}, self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name in PARAM_NAMES:
            key = prefix + name
            if key in state_dict:
                cur = getattr(self, name)
                new_shape = state_dict[key].shape
                if tuple(cur.shape) != tuple(new_shape):
                    # The count changes in training: adopt the checkpoint's shape before copying.
                    setattr(self, name, nn.Parameter(cur.new_empty(new_shape), requires_grad=cur.requires_grad))
        extra_key = prefix + EXTRA_STATE_KEY
        has_extra = extra_key in state_dict
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "xyz" in state_dict:
            self.pending_init = None  # the checkpoint's Gaussians: nothing left to sample
        if not has_extra:
            # Written before the densification state was saved: the Gaussians load, their statistics
            # restart from zero (what loading did before), and a strict load does not fail on the key.
            missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k != extra_key]
            self.strategy.reset_stats(self)

    # -- mesh export -----------------------------------------------------------------------------------

    def _field_inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.no_grad():
            means = self.xyz.detach()
            cov = self.covariance().detach()
            # Tiny Gaussians make a singular covariance; a floor keeps the inverse finite.
            cov = cov + 1e-8 * torch.eye(3, device=cov.device, dtype=cov.dtype)
            cov_inv = torch.linalg.inv(cov)
            extent = self.cfg.isosurface_sigmas * torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0))
            return means, cov_inv, extent, self.get_opacity.detach().squeeze(-1)

    def density(self, points: Tensor) -> Tensor:
        """Summed Gaussian density ``sum_i opacity_i exp(-0.5 maha_i^2)`` at points [P, 3] -> [P]."""
        means, cov_inv, extent, w = self._field_inputs()
        d, _ = gaussian_field_sum(points.to(means), means, cov_inv, extent, w)
        return d

    def _density_threshold(self, dens: Tensor | None = None, extinction: Tensor | None = None) -> float:
        """``density_thresh`` as a number; ``auto`` needs the density and extinction grids [R, R, R]."""
        thr = self.cfg.density_thresh
        if thr != "auto":
            return float(thr)
        if dens is None or extinction is None:
            raise ValueError("gaussian-splatting: density_thresh 'auto' needs the density grids that isosurface() samples")
        return opacity_matched_level(dens, extinction, self.cfg.radius)

    def isosurface(self) -> Mesh:
        """Marching cubes on the summed density at ``density_thresh`` over [-radius, radius]^3.

        With ``isosurface_fill`` (the default) the hidden inside is made solid first, with the
        extinction field below, so the surface is the outside of what renders opaque, never an inner
        face of a shell or the sponge of a shell whose Gaussians do not overlap at the level.

        ``density_thresh: auto`` takes the level whose surface best matches the rendered one
        (:func:`lift3d.geometry.isosurface.opacity_matched_level`): along orthographic rays from
        20 directions, where the Gaussians' opacity reaches 50%. The opacity comes from an
        extinction field with the Gaussians' footprints, ``sum_i tau_i g_i(x) / (sqrt(2 pi) s_i)``
        with ``tau_i = -ln(1 - o_i)`` and ``s_i`` the geometric mean of the scales: a ray through
        a Gaussian's centre gets the optical depth that splatting gives it (exactly for isotropic
        Gaussians), and the field comes in the same pass as the density. (With ``o_i`` in place of
        ``tau_i``, the small-alpha limit, opaque Gaussians look too thin and the level lands deeper.)
        A level read off the Gaussians themselves, such as half the median density at the centres
        of opaque ones, is pulled deep by dense inner clusters. bench/README.md compares the rules
        per prompt.
        """
        R, radius = self.cfg.isosurface_resolution, self.cfg.radius
        pts = grid_points(R, radius, device=self.xyz.device).reshape(-1, 3)
        dens, ext = self._density_and_extinction(pts)
        dens, ext = dens.reshape(R, R, R), ext.reshape(R, R, R)
        thr = self._density_threshold(dens, ext)
        level = thr - dens
        if self.cfg.isosurface_fill:
            level = fill_hidden(fill_cavities(level), ext, 2.0 * radius / (R - 1))
        try:
            return marching_cubes_grid(level, radius, what="Gaussian density")
        except IsosurfaceError as exc:
            raise IsosurfaceError(f"{exc} (gaussian-splatting density_thresh={thr:.4g})") from None

    def _density_and_extinction(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Summed density and the extinction field (per world unit) at points [P, 3], in one pass."""
        means, cov_inv, extent, w = self._field_inputs()
        thickness = math.sqrt(2.0 * math.pi) * torch.exp(self.scaling.detach().mean(-1))  # [N]
        tau = -torch.log1p(-w.clamp(max=0.99))  # optical depth of an opacity (alpha clamp as the renderer)
        # The density weights are the opacities, so the extinction rides along as a value.
        per_opacity = torch.where(w > 1e-6, tau / w.clamp(min=1e-6), torch.ones_like(w)) / thickness
        dens, acc = gaussian_field_sum(points.to(means), means, cov_inv, extent, w, per_opacity[:, None])
        return dens, acc[:, 0]

    def export_attributes(self, points: Tensor) -> dict[str, Tensor]:
        """``features`` [N, 3]: density-weighted view-independent colour of the Gaussians near each point."""
        means, cov_inv, extent, w = self._field_inputs()
        pts = points.detach().to(means)
        with torch.no_grad():
            cols = self.base_colors().detach()
            dens, acc = gaussian_field_sum(pts, means, cov_inv, extent, w, cols)
            out = acc / dens.clamp_min(1e-12)[:, None]
            empty = dens < 1e-8
            if empty.any():
                # No Gaussian reaches these points: take the nearest Gaussian's colour.
                nn_idx = _nearest(pts[empty], means)
                out[empty] = cols[nn_idx]
        return {"features": out.clamp(0.0, 1.0).to(points.dtype)}

    # -- PLY ----------------------------------------------------------------------------------------

    def export_ply(self, path: str | Path) -> None:
        """Write the standard 3DGS PLY (binary little endian) that Gaussian viewers read."""
        with torch.no_grad():
            write_gaussian_ply(
                path,
                xyz=self.xyz.cpu().numpy(),
                f_dc=self.features_dc.cpu().numpy(),
                f_rest=self.features_rest.cpu().numpy(),
                opacity=self.opacity.cpu().numpy(),
                scale=self.scaling.cpu().numpy(),
                rotation=self.rotation.cpu().numpy(),
            )

    def load_ply(self, path: str | Path) -> None:
        """Read a 3DGS PLY (all parameters) or a plain point cloud PLY (x, y, z and optional red, green, blue:
        integers over 255, floats in [0, 1]; without them, ``init_color`` or random colours)."""
        from lift3d.utils.point_cloud_io import read_point_cloud_ply

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"gaussian-splatting: init PLY {path} does not exist")
        try:
            verts = read_ply_vertices(path)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"gaussian-splatting: init PLY {path} cannot be read: {exc}") from None
        gaussian_fields = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
                           "rot_0", "rot_1", "rot_2", "rot_3"]
        if all(k in verts for k in gaussian_fields):
            g = read_gaussian_ply(path)
            n_rest = g["f_rest"].shape[1]
            if n_rest != self.n_rest:
                f_rest = torch.zeros(g["xyz"].shape[0], self.n_rest, 3)
                k = min(n_rest, self.n_rest)
                f_rest[:, :k] = torch.from_numpy(g["f_rest"][:, :k])
            else:
                f_rest = torch.from_numpy(g["f_rest"])
            self._set_params(
                xyz=torch.from_numpy(g["xyz"]), features_dc=torch.from_numpy(g["f_dc"]), features_rest=f_rest,
                scaling=torch.from_numpy(g["scale"]), rotation=torch.from_numpy(g["rotation"]),
                opacity=torch.from_numpy(g["opacity"]),
            )
            return
        if not all(k in verts for k in ("x", "y", "z")) or len(verts["x"]) == 0:
            found = ", ".join(verts) or "none"
            raise ConfigError(
                f"gaussian-splatting: init PLY {path} is neither a 3D Gaussian PLY ({', '.join(gaussian_fields)}) nor "
                f"a point cloud (x, y, z, optionally red, green, blue) with at least one point; its vertices have "
                f"{len(next(iter(verts.values()), []))} rows and the fields: {found}")
        xyz, rgb = read_point_cloud_ply(path)
        colors = torch.from_numpy(rgb) if all(c in verts for c in ("red", "green", "blue")) else None
        self.init_from_points(torch.from_numpy(xyz), colors)


def knn_mean_distance(points: Tensor, k: int = 3, chunk: int = 2048) -> Tensor:
    """[N] mean distance to the ``k`` nearest other points (chunked, O(N^2) time, O(chunk N) memory)."""
    n = points.shape[0]
    if n <= 1:
        return torch.full((n,), 0.01)
    k = min(k, n - 1)
    out = torch.empty(n)
    for i in range(0, n, chunk):
        d = torch.cdist(points[i : i + chunk], points)  # [c, N]
        d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = float("inf")
        out[i : i + chunk] = d.topk(k, dim=1, largest=False).values.mean(1)
    return out


def _nearest(queries: Tensor, points: Tensor, chunk: int = 4096) -> Tensor:
    out = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    for i in range(0, queries.shape[0], chunk):
        out[i : i + chunk] = torch.cdist(queries[i : i + chunk], points).argmin(1)
    return out


__all__ = ["GaussianModel", "gaussian_field_sum", "knn_mean_distance"]
